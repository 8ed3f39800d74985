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


def _attention_like_model(seed: int):
    """q/k/v (with biases) and gate/up reading one input, o/down after them: a decoder layer's LoRA shapes."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(48, 64), torch.nn.Linear(48, 16),
                                                     torch.nn.Linear(48, 16))
            self.o_proj = torch.nn.Linear(64, 48, bias=False)
            self.gate_proj, self.up_proj = torch.nn.Linear(48, 96, bias=False), torch.nn.Linear(48, 96, bias=False)
            self.down_proj = torch.nn.Linear(96, 48, bias=False)

        def forward(self, x):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            h = x + self.o_proj(q * torch.cat([k, v, k, v], -1))
            return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    torch.manual_seed(seed)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.mark.train_env
@pytest.mark.parametrize("groups,stacked,align", [("1", "1", "8"), ("1", "0", "8"), ("0", "1", "8"), ("0", "0", "8"),
                                                  ("1", "backward", "64")])
def test_shared_input_groups_and_stacks_match_peft_outputs_and_gradients(monkeypatch, groups, stacked, align):
    """q/k/v and gate/up as groups, o/down with A stacked under W (rank 4: padded rows), each on and off."""
    import torch

    from workflow.patches.peft_lora_fast_path import _LoraGroup, _LoraStack

    monkeypatch.setenv("WORKFLOW_LORA_GROUPS", groups)
    monkeypatch.setenv("WORKFLOW_LORA_STACKED", stacked)
    monkeypatch.setenv("WORKFLOW_LORA_STACKED_ALIGN", align)
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)  # fp64: the sums differ in order only
    results = []
    for fused in (False, True):
        model = _attention_like_model(seed=0).double()
        callback = None
        if fused:
            from types import SimpleNamespace

            from workflow.patches.peft_lora_fast_path import lora_fast_path_callback

            callback = lora_fast_path_callback()
            callback.on_train_begin(SimpleNamespace(bf16=False, fp16=False), None, None, model=model)
            kinds = [type(g) for g in callback.groups]
            assert kinds.count(_LoraGroup) == (2 if groups == "1" else 0)
            assert kinds.count(_LoraStack) == (0 if stacked == "0" else 2)  # o_proj, down_proj (q/k/v: biases,
            # gate/up: wider outputs)
        x.grad = None
        for _ in range(2):  # twice: B's columns are rewritten each forward
            out = model(x)
            out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads, x.grad.clone()))
        if callback is not None:
            weights = [m.get_base_layer().weight for m in model.modules() if hasattr(m, "_lora_group")]
            callback.on_train_end(None, None, None, model=model)
            assert all(w.is_contiguous() for w in weights) and not any(hasattr(m, "_lora_group")
                                                                       for m in model.modules())
            torch.testing.assert_close(model(x), out)  # the members' own forward again, same weights
    (out_peft, grads_peft, dx_peft), (out_fused, grads_fused, dx_fused) = results
    assert len(grads_peft) == 14  # A and B of 7 projections
    torch.testing.assert_close(out_fused, out_peft)
    torch.testing.assert_close(dx_fused, dx_peft)
    for name in grads_peft:
        torch.testing.assert_close(grads_fused[name], grads_peft[name], msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="bf16 matmuls on a GPU: run on a GPU machine")
@pytest.mark.train_env
def test_shared_input_groups_on_a_gpu_match_peft_on_a_bf16_qwen2_under_autocast():
    """A 2-layer bf16 Qwen2 with LoRA on every projection, trained as the fast recipe does (autocast
    bf16, fp32 adapters): loss and adapter gradients of PEFT's forward, the fast path, the groups, and
    the groups with o/down stacked."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from workflow.patches.peft_lora_fast_path import lora_fast_path_callback

    config = Qwen2Config(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    ids = torch.randint(0, 512, (2, 200), device="cuda")
    results = {}
    for variant in ("peft", "single", "groups", "stacked"):
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        if variant != "peft":
            callback = lora_fast_path_callback()
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("WORKFLOW_LORA_GROUPS", "0" if variant == "single" else "1")
                mp.setenv("WORKFLOW_LORA_STACKED", "1" if variant == "stacked" else "0")
                callback.on_train_begin(SimpleNamespace(bf16=True, fp16=False), None, None, model=model)
            assert len(callback.groups) == {"single": 0, "groups": 4, "stacked": 8}[variant]
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results[variant] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    loss_peft, grads_peft = results["peft"]
    for variant in ("single", "groups", "stacked"):
        loss, grads = results[variant]
        assert abs(loss - loss_peft) < 1e-2 * abs(loss_peft), variant
        for name, want in grads_peft.items():
            error = (grads[name] - want).norm() / want.norm()
            assert error < 3e-2, (variant, name, float(error))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="bf16 matmuls on a GPU: run on a GPU machine")
@pytest.mark.train_env
@pytest.mark.parametrize("stacked", ["1", "backward"])
def test_stacked_lora_on_a_gpu_rounds_no_worse_than_peft(stacked):
    """A down_proj-shaped LoRA layer (in 4x out) in bf16 under autocast: PEFT's path and the stacked one
    against the same layer in fp64; output, input gradient and adapter gradients no further off than PEFT's."""
    import copy
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from workflow.patches.peft_lora_fast_path import _LoraStack, lora_fast_path_callback

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4096, 1024, bias=False)).to("cuda", torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    x = torch.randn(2, 3000, 4096, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn(2, 3000, 1024, device="cuda", dtype=torch.float64)

    def run(net, dtype, autocast):
        inp = x.detach().to(dtype, copy=True).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = net(inp)
        (out.double() * upstream).sum().backward()
        grads = {n: p.grad.double() for n, p in net.named_parameters() if p.requires_grad}
        return out.detach().double(), inp.grad.double(), grads

    reference = run(copy.deepcopy(model).double(), torch.float64, False)
    peft = run(copy.deepcopy(model), torch.bfloat16, True)
    stacked_model = copy.deepcopy(model)
    callback = lora_fast_path_callback()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKFLOW_LORA_STACKED", stacked)
        callback.on_train_begin(SimpleNamespace(bf16=True, fp16=False), None, None, model=stacked_model)
    assert [type(g) for g in callback.groups] == [_LoraStack]
    stacked = run(stacked_model, torch.bfloat16, True)

    def error(got, want):
        return float((got - want).norm() / want.norm())

    for what, want, got_peft, got_stacked in (("output", reference[0], peft[0], stacked[0]),
                                              ("input gradient", reference[1], peft[1], stacked[1])):
        assert error(got_stacked, want) <= max(1.25 * error(got_peft, want), 1e-3), what
    for name, want in reference[2].items():
        assert error(stacked[2][name], want) <= max(1.25 * error(peft[2][name], want), 1e-3), name
