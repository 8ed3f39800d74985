"""The GPU training bench's pure parts: the model shape, the FLOPs formula, the arguments it runs.

The bench itself needs a GPU; these checks run anywhere (transformers' config class only).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))  # the script imports bench/record.py as `record`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


class _Tokenizer:
    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}[token]


def test_model_has_qwen25_7b_parameter_count(bench):
    config = bench.qwen25_7b_config(_Tokenizer())
    h, L, kv = config.hidden_size, config.num_hidden_layers, 512
    embedding = config.vocab_size * h
    biases = L * (h + 2 * kv)                  # q, k, v projections have biases
    norms = L * 2 * h + h
    # Qwen2.5-7B-Instruct's count (LLaMA-Factory printed it for the built model, LoRA excluded).
    assert bench.matmul_params(config) + embedding + biases + norms == 7_615_616_512
    assert config.vocab_size == 152064 and not config.tie_word_embeddings


def test_flops_formula(bench):
    config = bench.qwen25_7b_config(_Tokenizer())
    # N, by hand: per block q 3584·3584 = 12,845,056; k and v 3584·512 = 1,835,008 each (4 KV heads of 128);
    # o 12,845,056; gate, up and down 3584·18944 = 67,895,296 each: 233,046,016 a block, 6,525,288,448 for 28;
    # the LM head 152064·3584 = 544,997,376. N = 7,070,285,824 (the README's 7.07 B).
    assert bench.matmul_params(config) == 7_070_285_824
    # 1,000 tokens with no attention term: 4·N·1000.
    assert bench.model_flops(config, tokens=1000, sum_sq=0) == 28_281_143_296_000
    # One row of 200 tokens: 4·N·200 = 5,656,228,659,200, plus causal attention 6·L·H·d·n²
    # = 6·28·28·128·40,000 = 24,084,480,000.
    assert bench.model_flops(config, tokens=200, sum_sq=200**2) == 5_680_313_139_200


def test_runs_the_train_stage_arguments_with_only_the_listed_overrides(bench, tmp_path):
    args, dropped = bench.variant_args("reference", {}, data=tmp_path / "d", model=tmp_path / "m",
                                       output=tmp_path / "o")
    # recipes/viggo-qwen2.5-7b.yaml's train.llamafactory (the tutorial's lora_sft.yaml), written out by hand:
    tutorial = {"stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "template": "qwen",
                "cutoff_len": 2048, "overwrite_cache": True, "preprocessing_num_workers": 16,
                "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
                "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "bf16": True, "logging_steps": 10,
                "save_steps": 100}
    # what the train stage adds (the upstream stages' paths, do_train, quiet progress), and the bench's
    # overrides: one epoch, no checkpoints, TensorBoard, loss plot or evaluation.
    pipeline = {"do_train": True, "disable_tqdm": True, "model_name_or_path": str(tmp_path / "m"),
                "dataset_dir": str(tmp_path / "d"), "dataset": "train", "output_dir": str(tmp_path / "o")}
    bench_overrides = {"num_train_epochs": 1, "save_strategy": "no", "report_to": "none", "plot_loss": False,
                       "eval_strategy": "no", "overwrite_output_dir": True}
    assert args == {**tutorial, **pipeline, **bench_overrides}
    # Dropped: one process (no DDP), --rows sets the data; nothing else of the recipe.
    assert dropped == {"ddp_backend": "nccl", "ddp_timeout": 180000000, "max_samples": 1000}


def test_try_changes_keys_of_a_named_recipe(bench, tmp_path):
    name, base, changes = bench.parse_try("big=fast:per_device_train_batch_size=16,learning_rate=4e-4,packing=false")
    assert (name, base) == ("big", "fast")
    assert changes == {"per_device_train_batch_size": 16, "learning_rate": 4e-4, "packing": False}
    args, _ = bench.variant_args(base, changes, data=tmp_path, model=tmp_path, output=tmp_path)
    assert args["per_device_train_batch_size"] == 16 and args["learning_rate"] == 4e-4 and args["packing"] is False
