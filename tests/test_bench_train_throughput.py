"""The GPU training bench's pure parts: the model shape, the FLOPs formula, the arguments it runs.

The bench itself needs a GPU; these checks run anywhere (transformers' config class only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from workflow.config import load_recipe
from workflow.training.llamafactory_args import llamafactory_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    n = bench.matmul_params(config)
    assert bench.model_flops(config, tokens=1000, sum_sq=0) == 4 * n * 1000
    # One row of 200 tokens: causal attention adds 6·L·H·d·n².
    assert bench.model_flops(config, tokens=200, sum_sq=200**2) - 4 * n * 200 == 6 * 28 * 28 * 128 * 200**2


def test_runs_the_train_stage_arguments_with_only_the_listed_overrides(bench, tmp_path):
    args, dropped = bench.variant_args("reference", {}, data=tmp_path / "d", model=tmp_path / "m",
                                       output=tmp_path / "o")
    section = load_recipe(bench.RECIPES["reference"]).train.llamafactory
    expected = llamafactory_args(section, model=str(tmp_path / "m"), dataset_dir=str(tmp_path / "d"),
                                 output_dir=str(tmp_path / "o"))
    for key in bench.DROPPED_KEYS:
        expected.pop(key, None)
    expected.update(bench.BENCH_OVERRIDES)
    assert args == expected
    assert set(dropped) <= set(bench.DROPPED_KEYS) and "ddp_backend" in dropped
    # The tutorial's settings reach LLaMA-Factory untouched.
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], args["cutoff_len"]) == (1, 8, 2048)


def test_try_changes_keys_of_a_named_recipe(bench, tmp_path):
    name, base, changes = bench.parse_try("big=fast:per_device_train_batch_size=16,learning_rate=4e-4,packing=false")
    assert (name, base) == ("big", "fast")
    assert changes == {"per_device_train_batch_size": 16, "learning_rate": 4e-4, "packing": False}
    args, _ = bench.variant_args(base, changes, data=tmp_path, model=tmp_path, output=tmp_path)
    assert args["per_device_train_batch_size"] == 16 and args["learning_rate"] == 4e-4 and args["packing"] is False
