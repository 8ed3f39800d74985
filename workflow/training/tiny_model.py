"""A tiny Qwen2-architecture model for tests and the CPU demo.

Random weights, a byte-level BPE tokenizer trained on the dataset's own text, and the
ChatML chat template that LLaMA-Factory's ``qwen`` template produces (including its default
system prompt), saved in Hugging Face format so LLaMA-Factory, transformers and vLLM load it
exactly as they would load a real Qwen2.5 model.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ..config import TinyModelConfig
from ..core.console import say
from ..core.errors import WorkflowError

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5-Instruct's template without the tool-calling branches.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def iter_text(paths: list[str | Path]) -> Iterator[str]:
    """Every string value in JSONL / JSON / CSV files (messages' contents included)."""

    def strings(value) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for path in map(Path, paths):
        if not path.is_file():
            raise WorkflowError(f"{path}: data file not found")
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    yield from strings(row)
        elif path.suffix == ".json":
            yield from strings(json.loads(path.read_text()))
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield from strings(json.loads(line))


def train_tokenizer(paths: list[str | Path], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Exactly Qwen2's normalizer and pre-tokenizer (digits one by one, ...): newer transformers
    # rebuild a qwen2 model's tokenizer with them whatever tokenizer.json says, so anything
    # else would tokenize differently in the train and serve environments.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The chat markup is text too; training on it keeps "system", "user", "assistant" single tokens.
    markup = ["system\n" + DEFAULT_SYSTEM, "user\n", "assistant\n"]
    tok.train_from_iterator(list(iter_text(paths)) + markup, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(data: list[str | Path], out: str | Path, cfg: TinyModelConfig) -> Path:
    """Train a tokenizer on ``data``, build a random-weight Qwen2 model, save both to ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = train_tokenizer(list(data), cfg.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"[tiny-model] {n_params / 1e6:.1f} M parameters, vocab {len(tokenizer)}, saved to {out}")
    return out
