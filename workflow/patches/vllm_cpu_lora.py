"""A faster LoRA path for vLLM on the CPU, loaded into every vLLM process as a vLLM plugin.

vLLM's CPU LoRA ops (``vllm.lora.ops.torch_ops``) gather one full LoRA weight matrix per
token (``lora_b_weights[indices]``) and multiply with an einsum, so a batch of prompts
materialises a ``tokens x out x rank`` tensor in every adapted layer. Tokens of a batch use a
handful of distinct adapters, so the same product is computed here with one matmul per distinct
adapter index, giving identical results: 128 prompts through a rank-64 adapter on a tiny model took
62.2 s with vLLM's ops (2.0 s through the base) and 4.3 s with these, 14x faster (bench/cpu_lora_ops.py,
2-core CPU VM, 2026-11-22). The patch is applied only on the CPU platform; set
``WORKFLOW_VLLM_CPU_LORA_PATCH=0`` to measure vLLM's own ops.

It also fixes what vLLM's CPU ops do with the tokens of base-model requests: their adapter
index is -1 ("no LoRA"), which ``lora_b_weights[indices]`` reads as the *last* adapter slot, so
a base-model request batched with adapter requests got that adapter's delta (on the CPU
demo the "base" scored slot F1 0.28 instead of 0 in one run, depending on how the engine
happened to batch base and adapter rows). Here those tokens get no LoRA contribution.

Registered in pyproject.toml under the ``vllm.general_plugins`` entry point group; applied only
to the vLLM versions in ``TESTED`` (elsewhere vLLM's own ops run, with one warning line).
"""

from __future__ import annotations

import os

from . import replace_attribute, supported, warn

PATCH = "workflow.patches.vllm_cpu_lora"
TESTED = {"vllm": "==0.32.*"}
CONSEQUENCE = ("vLLM's own CPU LoRA ops run: adapter prompts ~14x slower, and base-model rows batched with "
               "adapter rows may get an adapter's delta")
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def grouped_lora_product(inputs, weights, indices, dtype):
    """``out[t] = weights[indices[t]] @ inputs[t]``, one matmul per distinct index; 0 where the index is -1."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    inputs = inputs.to(dtype=dtype)
    distinct = torch.unique(indices).tolist()
    if len(distinct) == 1 and distinct[0] >= 0:
        return inputs @ weights[distinct[0]].to(dtype=dtype).T
    out = torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for index in distinct:
        if index < 0:  # a base-model token: no adapter
            continue
        rows = indices == index
        out[rows] = inputs[rows] @ weights[index].to(dtype=dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def register() -> None:
    """vLLM plugin entry: swap the CPU LoRA ops (the sgmv_* ops call these bgmv_* by module lookup)."""
    if os.environ.get("WORKFLOW_VLLM_CPU_LORA_PATCH", "1") == "0":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not supported(PATCH, TESTED, CONSEQUENCE):
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    modules = (ops, package, punica_cpu)
    missing = [f"{m.__name__}.{name}" for m in modules for name in OPS if not hasattr(m, name)]
    if missing:  # checked before any is replaced: all of them or none
        warn(PATCH, f"{missing[0]} does not exist; {CONSEQUENCE}")
        return
    ours = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for module in modules:
        for name in OPS:
            replace_attribute(module, name, ours[name])
