"""The parity check's PEFT reference for a model of a real shape, through the evaluate stage's own function.

Builds a random-weight model of the Qwen2.5-7B-Instruct shape (``--shape qwen2.5-7b``; ``tiny`` for a quick
run) with a byte-level tokenizer trained on the bundled ViGGO data, saves it in bfloat16 with a random rank-8
LoRA adapter on all linear layers (``recipes/viggo-qwen2.5-7b.yaml``'s), then calls
``workflow.evaluation.parity.stored_reference`` as the evaluate stage does for an engine on GPUs: a Ray task
with one GPU (``--gpus``; 0 runs the same task on the CPU) in the train environment's interpreter, in the
engine's dtype (``auto``: the model's bfloat16), on ``--rows`` ViGGO test rows with the 7B recipe's
``max_tokens``. Random weights rarely emit the end token, so every row decodes ``--max-tokens`` tokens: the
time is an upper bound for that many rows and tokens.

    python bench/parity_reference.py                         # a GPU machine: bench/results/parity_reference/<gpu>.json
    python bench/parity_reference.py --shape tiny --gpus 0 --out /tmp/p.json

The train environment's interpreter must be named where there are no ``.venvs`` (``WORKFLOW_TRAIN_PYTHON``).
Writes ``bench/results/parity_reference/<machine>.json`` (bench/record.py; ``--out`` to override).
Figures: the whole call's seconds (Ray start, the task's process and imports, model load, decoding), the
task's own seconds (model load + decoding), the task's peak GPU memory (``torch.cuda.max_memory_allocated``),
the dtype it computed in, rows, generated tokens.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402

# Qwen2.5-7B-Instruct's config.json (the shape; the weights are random).
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# recipes/viggo-qwen2.5-7b.yaml: LLaMA-Factory's lora_target: all on Qwen2 is these modules.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: dict, out: Path) -> tuple[Path, Path, float]:
    """(model folder, adapter folder, parameters in billions): random weights in bfloat16, a random LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from workflow.training.tiny_model import train_tokenizer

    tokenizer = train_tokenizer([REPO / "data" / "viggo" / "train.csv"], 4000)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(**shape, eos_token_id=eos, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 on the GPU: 15 GB, not 30 GB of float32 first
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=config.pad_token_id)
    model_dir, adapter_dir = out / "model", out / "adapter"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (an adapter that changes nothing); give it weights
                weight.normal_(0.0, 0.02)
    lora.save_pretrained(adapter_dir)
    del model, lora
    if device == "cuda":
        torch.cuda.empty_cache()
    return model_dir, adapter_dir, params


def viggo_rows(n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` ViGGO test rows as the chat messages the evaluate stage sends (the CPU demo's instruction)."""
    import yaml

    from workflow.prompts.messages import row_messages

    instruction = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())["ingest"]["instruction"]
    with open(REPO / "data" / "viggo" / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [row_messages({"instruction": instruction, "input": r["ref"]}) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["qwen2.5-7b", "tiny"], default="qwen2.5-7b")
    parser.add_argument("--rows", type=int, default=16, help="evaluate.parity.rows (default 16)")
    parser.add_argument("--max-tokens", type=int, default=250, help="the 7B recipe's sampling_params.max_tokens")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the Ray task (the evaluate stage's: 1)")
    parser.add_argument("--machine", default=None, help="the result's machine kind (default: bench/record.py's)")
    parser.add_argument("--out", default=None, help="default: bench/results/parity_reference/<machine>.json")
    args = parser.parse_args()

    import ray

    from workflow.config.evaluate import ParityConfig
    from workflow.evaluation import parity

    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        started = time.monotonic()
        model_dir, adapter_dir, params = build(QWEN25_7B if args.shape == "qwen2.5-7b" else TINY, Path(tmp))
        built = time.monotonic() - started
        rows = viggo_rows(args.rows)
        # The evaluate stage's dtype rule, for the 7B recipe's engine (no engine_kwargs.dtype: vLLM's auto).
        dtype = parity.reference_dtype(ParityConfig(), {"tensor_parallel_size": 1})
        started = time.monotonic()
        found = parity.stored_reference(
            model_manifest={"fingerprint": "bench-model", "outputs": {"model": str(model_dir)}},
            train_manifest={"fingerprint": "bench-train"}, adapters={"viggo": str(adapter_dir)}, rows=rows,
            template="qwen", dtype=dtype, max_tokens=args.max_tokens, cache_uri=f"{tmp}/cache",
            scratch=Path(tmp) / "scratch", gpus=args.gpus)["viggo"]
        seconds = time.monotonic() - started
        ray.shutdown()
    generated = sum(len(r["generated_ids"]) for r in found["rows"])
    figures = {"shape": args.shape, "parameters_billions": round(params, 2), "dtype": found["dtype"],
               "device": found["device"], "rows": len(found["rows"]), "max_tokens": args.max_tokens,
               "generated_tokens": generated, "call_seconds": round(seconds, 1), "task_seconds": found["seconds"],
               "tokens_per_second_in_task": round(generated / found["seconds"], 1),
               "peak_gpu_memory_gib": (round(found["peak_gpu_memory_bytes"] / 2**30, 2)
                                       if "peak_gpu_memory_bytes" in found else None),
               "model_build_seconds": round(built, 1), "versions": found["versions"]}
    print(json.dumps(figures, indent=2))
    record.write("parity_reference", figures, args.out, machine=args.machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
