"""vLLM's CPU LoRA ops vs the grouped ops of workflow/patches/vllm_cpu_lora.py, on the same engine settings.

    WORKFLOW_VLLM_CPU_LORA_PATCH=1 python bench/cpu_lora_ops.py ROWS MODEL ADAPTER TEST_JSONL
    WORKFLOW_VLLM_CPU_LORA_PATCH=0 python bench/cpu_lora_ops.py ROWS MODEL ADAPTER TEST_JSONL

Prints the seconds to answer ROWS test prompts (32 new tokens each) with the base model and
with the adapter, in one engine.
"""
import json
import os
import sys
import time

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

if __name__ == "__main__":
    rows = [json.loads(line) for line in open(sys.argv[4])][:int(sys.argv[1])]
    msgs = [[{"role": "user", "content": r["instruction"] + "\n" + r["input"]}] for r in rows]
    llm = LLM(model=sys.argv[2], dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True, max_lora_rank=64, max_loras=1)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    started = time.time()
    llm.chat(msgs, sp, use_tqdm=False)
    base = time.time() - started
    started = time.time()
    llm.chat(msgs, sp, lora_request=LoRARequest("a", 1, sys.argv[3]), use_tqdm=False)
    lora = time.time() - started
    print(f"RESULT patch={os.environ.get('WORKFLOW_VLLM_CPU_LORA_PATCH','1')} rows={len(rows)} base={base:.1f}s lora={lora:.1f}s")
