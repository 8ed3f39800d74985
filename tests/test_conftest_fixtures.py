"""The shared fixtures themselves: the tiny model loads in transformers; the adapter has PEFT's files."""

import json


def test_tiny_model_loads_and_renders_chatml(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.model_type == "qwen2" and cfg.head_dim >= 64
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_tiny_adapter_is_rank_8_on_all_linear_layers(tiny_adapter):
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(cfg["target_modules"])
