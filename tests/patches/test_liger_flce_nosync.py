"""workflow.patches.liger_flce_nosync: Liger's fused linear cross-entropy, same results without host waits."""

from __future__ import annotations

import pytest

import workflow.patches as patches


@pytest.fixture
def liger_module(monkeypatch):
    pytest.importorskip("liger_kernel", reason="liger-kernel is installed in the train environment only")
    import importlib

    from workflow.patches import liger_flce_nosync

    monkeypatch.setattr(patches, "_warned", set())
    module = importlib.import_module(liger_flce_nosync.MODULE)
    yield module
    liger_flce_nosync.restore()


@pytest.mark.train_env
def test_both_lines_are_replaced_and_nothing_else(liger_module):
    import inspect

    from workflow.patches import liger_flce_nosync

    originals = {name: getattr(liger_module, name) for name, _, _ in liger_flce_nosync.EDITS}
    assert liger_flce_nosync.apply()
    for name, _, _ in liger_flce_nosync.EDITS:
        function = getattr(liger_module, name)
        assert function is not originals[name] and function.__wrapped__ is originals[name]
        assert function.__globals__ is liger_module.__dict__
        assert inspect.signature(function) == inspect.signature(originals[name])
    assert liger_flce_nosync.apply()  # twice: already applied
    liger_flce_nosync.restore()
    assert all(getattr(liger_module, name) is f for name, f in originals.items())


@pytest.mark.train_env
def test_switch_and_version_gate(liger_module, monkeypatch, capsys):
    from workflow.patches import liger_flce_nosync

    monkeypatch.setenv("WORKFLOW_LIGER_NOSYNC", "0")
    assert not liger_flce_nosync.apply()
    monkeypatch.delenv("WORKFLOW_LIGER_NOSYNC")
    monkeypatch.setattr(patches, "installed_version", lambda package: "0.1.0")
    assert not liger_flce_nosync.apply()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "liger_kernel 0.1.0 is outside the versions it was tested on" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Liger's Triton kernels: run on a GPU machine")
@pytest.mark.train_env
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_same_loss_and_gradients_on_a_gpu(liger_module, reduction, monkeypatch):
    """Bit for bit with Liger's own chunks (the larger chunks change the rounding: the next test)."""
    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from workflow.patches import liger_flce_nosync

    torch.manual_seed(0)
    x = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, 3000, (700,), device="cuda")
    target[::7] = -100
    monkeypatch.setenv("WORKFLOW_LIGER_CHUNK_MEM", "1")
    results = []
    for patched in (False, True):
        if patched:
            assert liger_flce_nosync.apply()
        x.grad = None
        loss = liger_fused_linear_cross_entropy(x, weight, target, reduction=reduction)
        (loss / 3).backward()  # grad_output 1/3: the multiply the backward may skip
        results.append((loss.detach().clone(), x.grad.clone()))
        x.grad = None
        loss = liger_fused_linear_cross_entropy(x, weight, target, reduction=reduction)
        loss.backward()  # grad_output 1.0
        results.append((loss.detach().clone(), x.grad.clone()))
    for (want_loss, want_grad), (loss, grad) in zip(results[:2], results[2:]):
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Liger's Triton kernels: run on a GPU machine")
@pytest.mark.train_env
def test_larger_lm_head_chunks_give_the_same_loss_and_gradients_on_a_gpu(liger_module, monkeypatch):
    """WORKFLOW_LIGER_CHUNK_MEM=8: 4 chunks instead of 28 on a Qwen2.5-7B-sized LM head, same sums up to rounding."""
    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from workflow.patches import liger_flce_nosync

    torch.manual_seed(0)
    x = torch.randn(7160, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(152064, 3584, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.randint(0, 152064, (7160,), device="cuda")
    target[::5] = -100
    results = []
    for chunk_mem in ("1", "8"):
        liger_flce_nosync.restore()
        monkeypatch.setenv("WORKFLOW_LIGER_CHUNK_MEM", chunk_mem)
        assert liger_flce_nosync.apply()
        x.grad = None
        loss = liger_fused_linear_cross_entropy(x, weight, target, reduction="sum")
        (loss / 5000).backward()
        results.append((loss.detach().clone(), x.grad.clone()))
    (want_loss, want_grad), (loss, grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0)
    assert float((grad.float() - want_grad.float()).norm() / want_grad.float().norm()) < 1e-2
