"""vLLM's CPU LoRA ops against the grouped ops of workflow/patches/vllm_cpu_lora.py, side by side.

    .venvs/serve/bin/python bench/cpu_lora_ops.py --model DIR --adapter DIR --test TEST_JSONL [--rows 128]

Two engines on the same settings (float32, ``max_model_len`` 512, ``enforce_eager``, ``max_lora_rank``
64), each in a fresh process, one after the other: vLLM's ops (``WORKFLOW_VLLM_CPU_LORA_PATCH=0``) and
the workflow's (the plugin's default). Each answers ROWS test prompts (greedy, 32 new tokens,
``ignore_eos``) through the base model, then through the adapter, and reports the seconds of each.
Writes ``bench/results/cpu_lora_ops/<machine>.json`` (bench/record.py; ``--out`` to override).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import record

OPS = {"vllm": "0", "workflow": "1"}  # name: WORKFLOW_VLLM_CPU_LORA_PATCH


def measure(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    rows = [json.loads(line) for line in open(args.test)][:args.rows]
    msgs = [[{"role": "user", "content": r["instruction"] + "\n" + r["input"]}] for r in rows]
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True,
              max_lora_rank=64, max_loras=1)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    started = time.time()
    llm.chat(msgs, sp, use_tqdm=False)
    base = time.time() - started
    started = time.time()
    llm.chat(msgs, sp, lora_request=LoRARequest("a", 1, args.adapter), use_tqdm=False)
    return {"rows": len(rows), "base_s": round(base, 2), "adapter_s": round(time.time() - started, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True, help="a LoRA adapter folder of the model (rank <= 64)")
    parser.add_argument("--test", required=True, help="Alpaca JSONL rows (instruction, input), e.g. <run>/ingest/test.jsonl")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", help="result file (default bench/results/cpu_lora_ops/<machine>.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    found = {}
    for name, switch in OPS.items():
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--adapter", args.adapter, "--test",
               args.test, "--rows", str(args.rows), "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, env={**os.environ, "WORKFLOW_VLLM_CPU_LORA_PATCH": switch,
                                        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
                              capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"error: the {name} ops' engine failed (exit {proc.returncode})")
        found[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"{name:9s} ops: base {found[name]['base_s']:.1f} s, adapter {found[name]['adapter_s']:.1f} s", flush=True)
    figures = {"adapter_s": {n: r["adapter_s"] for n, r in found.items()},
               "base_s": {n: r["base_s"] for n, r in found.items()},
               "speedup": round(found["vllm"]["adapter_s"] / found["workflow"]["adapter_s"], 2),
               "rows": found["workflow"]["rows"], "max_tokens": args.max_tokens,
               "load_avg_1m": round(os.getloadavg()[0], 1)}
    record.write("cpu_lora_ops", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
