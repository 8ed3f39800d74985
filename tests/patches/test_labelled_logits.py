"""workflow.patches.labelled_logits: logits only at the labelled positions, same loss and gradients.

Train environment, CPU: tiny random Qwen2 and Llama models with a PEFT LoRA adapter (as the
train stage's SFT runs them), a batch of right-padded rows whose prompts are labelled -100.
"""

from __future__ import annotations

import pytest

from workflow.patches import labelled_logits

SFT = {"stage": "sft", "finetuning_type": "lora"}


def _lora_model(kind: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=300)
    model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape)))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the adapter a say in the loss
            torch.nn.init.normal_(param, std=0.02)
    return model.train()


def _batch():
    import torch

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (3, 20), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0  # right padding, as LLaMA-Factory's collator pads
    labels = input_ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[attention_mask == 0] = -100
    labels[2, :17] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _loss_and_grads(model, batch, **kwargs):
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.train_env
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("num_items", [None, 11])
def test_same_loss_and_gradients_as_the_models_own_forward(kind, num_items):
    import torch

    model = _lora_model(kind)
    lm = labelled_logits.causal_lm(model)
    assert labelled_logits.why_not(lm, SFT) is None
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    batch = _batch()
    want_loss, want_grads = _loss_and_grads(model, batch, **kwargs)

    lm.forward = labelled_logits.labelled_forward(lm)
    out = model(**batch, **kwargs)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape == (targets, 300)  # the prompt's positions were never projected
    got_loss, got_grads = _loss_and_grads(model, batch, **kwargs)

    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(want_grads) and any("lora_A" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    model.eval()  # evaluation and generation take the model's own forward: logits everywhere
    assert model(**batch).logits.shape == (3, 20, 300)


@pytest.mark.train_env
def test_used_only_where_it_is_the_same_computation(monkeypatch):
    lm = labelled_logits.causal_lm(_lora_model("qwen2"))
    assert labelled_logits.why_not(lm, {**SFT, "stage": "pt"}) == "stage pt, not sft"
    assert "use_dft_loss" in labelled_logits.why_not(lm, {**SFT, "use_dft_loss": True})
    monkeypatch.setenv("WORKFLOW_LABELLED_LOGITS", "0")
    assert labelled_logits.why_not(lm, SFT) == "WORKFLOW_LABELLED_LOGITS=0"
    monkeypatch.delenv("WORKFLOW_LABELLED_LOGITS")
    # Liger replaces the class's forward with its fused linear cross-entropy, which builds no logits.
    monkeypatch.setattr(type(lm), "forward", lambda self, **kw: None)
    assert "Liger" in labelled_logits.why_not(lm, SFT)


@pytest.mark.train_env
def test_outside_the_tested_versions_it_is_not_applied_with_one_warning(monkeypatch, capsys):
    import workflow.patches as patches

    monkeypatch.setattr(patches, "installed_version", lambda package: "0.1.0")
    monkeypatch.setattr(patches, "_warned", set())
    model = _lora_model("qwen2")
    callback = labelled_logits.labelled_logits_callback(SFT)
    args = type("Args", (), {"process_index": 0})()
    callback.on_train_begin(args, None, None, model=model)
    callback.on_train_begin(args, None, None, model=model)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert lines == ["warning: workflow.patches.labelled_logits not applied: llamafactory 0.1.0 is outside the "
                     "versions it was tested on (==0.9.5); the LM head computes the prompt's logits too"]
    assert "forward" not in vars(labelled_logits.causal_lm(model))
