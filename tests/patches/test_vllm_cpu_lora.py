"""The grouped CPU LoRA ops give vLLM's own results for adapter tokens and nothing for base-model
tokens (index -1, which vLLM's ops read as the last adapter slot), and the plugin is registered."""

import pytest


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_grouped_ops_match_vllm_torch_ops(dtype_name):
    import torch
    import vllm.lora.ops.torch_ops.lora_ops as vllm_ops

    from workflow.patches import vllm_cpu_lora as ours

    assert vllm_ops.bgmv_shrink is not ours.bgmv_shrink  # vLLM's own ops, not ours patched in by an earlier test
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    tokens, hidden, rank, out_dim, slots = 37, 64, 8, 48, 3
    indices = torch.tensor([0, 2, -1, 1] * 9 + [2])
    x = torch.randn(tokens, hidden, dtype=dtype)
    a = torch.randn(slots, 1, rank, hidden, dtype=dtype)
    b = torch.randn(slots, 1, out_dim, rank, dtype=dtype)
    h = torch.randn(tokens, rank, dtype=dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}

    lora = indices >= 0
    expected, got = torch.zeros(tokens, rank, dtype=dtype), torch.zeros(tokens, rank, dtype=dtype)
    vllm_ops.bgmv_shrink(x, a, expected, indices, 0.5)
    ours.bgmv_shrink(x, a, got, indices, 0.5)
    torch.testing.assert_close(got[lora], expected[lora], **tol)
    assert not got[~lora].any() and expected[~lora].any()  # vLLM's ops gave base tokens the last slot

    base = torch.randn(tokens, out_dim, dtype=dtype)
    expected, got = base.clone(), base.clone()
    vllm_ops.bgmv_expand(h, b, expected, indices, add_inputs=True)
    ours.bgmv_expand(h, b, got, indices, add_inputs=True)
    torch.testing.assert_close(got[lora], expected[lora], **tol)
    assert torch.equal(got[~lora], base[~lora])

    wide = torch.randn(tokens, out_dim * 2, dtype=dtype)
    expected, got = wide.clone(), wide.clone()
    vllm_ops.bgmv_expand_slice(h, b, expected, indices, out_dim, out_dim, add_inputs=True)
    ours.bgmv_expand_slice(h, b, got, indices, out_dim, out_dim, add_inputs=True)
    torch.testing.assert_close(got[lora], expected[lora], **tol)
    assert torch.equal(got[~lora], wide[~lora])

    no_adapter = torch.full((tokens,), -1)  # a step of base-model tokens only
    got = base.clone()
    ours.bgmv_expand(h, b, got, no_adapter, add_inputs=True)
    assert torch.equal(got, base)

    one = torch.zeros(tokens, dtype=torch.long)  # a batch that uses one adapter takes the single-matmul path
    expected, got = torch.zeros(tokens, rank, dtype=dtype), torch.zeros(tokens, rank, dtype=dtype)
    vllm_ops.bgmv_shrink(x, a, expected, one, 1.0)
    ours.bgmv_shrink(x, a, got, one, 1.0)
    torch.testing.assert_close(got, expected, **tol)


def test_plugin_is_registered_and_patches_the_cpu_ops(monkeypatch):
    from importlib.metadata import entry_points

    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as vllm_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from workflow.patches import vllm_cpu_lora

    # Setting each op to itself records vLLM's own for monkeypatch to put back after the test, so the
    # rest of the process (test_grouped_ops_match_vllm_torch_ops among it) compares against vLLM's ops.
    for module in (vllm_ops, package, punica_cpu):
        for name in vllm_cpu_lora.OPS:
            assert getattr(module, name) is not getattr(vllm_cpu_lora, name), "already patched before the test"
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.delenv("WORKFLOW_VLLM_CPU_LORA_PATCH", raising=False)
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "workflow_cpu_lora"]
    ep.load()()
    for module in (vllm_ops, package, punica_cpu):
        for name in vllm_cpu_lora.OPS:
            assert getattr(module, name) is getattr(vllm_cpu_lora, name), f"{module.__name__}.{name}"
