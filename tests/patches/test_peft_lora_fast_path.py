"""workflow.patches.peft_lora_fast_path: the same LoRA outputs and gradients in fewer passes, and its gate."""

from __future__ import annotations

import pytest

import workflow.patches as patches


def _lora_model(seed: int, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the adapter something to add
            torch.nn.init.normal_(param, std=0.5)
    return model


def _fast_path(model, **training_args):
    from types import SimpleNamespace

    from workflow.patches.peft_lora_fast_path import lora_fast_path_callback

    args = SimpleNamespace(**{"bf16": False, "fp16": False, **training_args})
    lora_fast_path_callback().on_train_begin(args, None, None, model=model)
    return model


@pytest.mark.train_env
def test_fused_lora_forward_matches_peft_outputs_and_gradients():
    import torch

    x = torch.randn(2, 5, 48)
    results = []
    for fused in (False, True):
        model = _lora_model(seed=0)
        if fused:
            _fast_path(model)
            assert all(hasattr(m, "_peft_forward") for n, m in model.named_modules() if n.endswith(("0", "2"))
                       and hasattr(m, "lora_A"))
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    (out_peft, grads_peft), (out_fused, grads_fused) = results
    assert len(grads_peft) == 4  # A and B of both layers
    torch.testing.assert_close(out_fused, out_peft)
    for name in grads_peft:
        torch.testing.assert_close(grads_fused[name], grads_peft[name])

    model = _lora_model(seed=0)  # adapters off: PEFT's own path, the base model alone
    _fast_path(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), model.base_model.model(x))


@pytest.mark.train_env
def test_fast_path_under_autocast_keeps_inputs_in_bf16_and_leaves_dropout_layers_to_peft():
    import torch

    x = torch.randn(3, 48)
    reference = _lora_model(seed=1)
    model = _fast_path(_lora_model(seed=1), bf16=True)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "_peft_forward")]
    assert len(lora_layers) == 2 and not any(m.cast_input_dtype_enabled for m in lora_layers)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # the optimizer's copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, peft = model(x), reference(x)
    assert fused.dtype == peft.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), peft.float(), rtol=0.02, atol=0.05)

    with_dropout = _fast_path(_lora_model(seed=1, dropout=0.1), bf16=True)
    assert not any(hasattr(m, "_peft_forward") for m in with_dropout.modules())


@pytest.mark.train_env
def test_fast_path_refuses_a_peft_outside_the_tested_versions(monkeypatch, capsys):
    monkeypatch.setattr(patches, "installed_version", lambda package: "0.1.0")
    monkeypatch.setattr(patches, "_warned", set())
    model = _fast_path(_lora_model(seed=0), process_index=0)
    assert not any(hasattr(m, "_peft_forward") for m in model.modules())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft 0.1.0 is outside the versions it was tested on" in err[0]
    assert "PEFT's own LoRA forward runs" in err[0]
