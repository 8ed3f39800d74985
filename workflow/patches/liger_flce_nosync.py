"""Liger's fused linear cross-entropy without its two host-device synchronisations per step.

``liger_kernel.ops.fused_linear_cross_entropy`` makes the host wait for the GPU twice in every
training step: the forward reads ``target_mask.sum().item()`` (the count of targets, which only
``reduction="mean"`` and token accuracy use: transformers' loss passes ``num_items_in_batch`` and
Liger then sums), and the backward asks ``torch.equal(grad_output, torch.tensor(1.0, device=...))``
to skip one multiply (a copy to the GPU and a read back). Each wait empties the GPU's queue: the
GPU then idles while the host launches the next kernels, and the host never gets ahead again.

Here the forward skips the count when a sum is asked for without class weights or token
accuracy (the kernel then never reads it), and the backward always multiplies the gradients by
``grad_output`` (by 1.0 when the skip would have applied: the same values). The same results.
The forward also splits the logits into fewer, larger chunks (``CHUNK_MEM``; the same sums up to
rounding, tested on an H100; ``WORKFLOW_LIGER_CHUNK_MEM=1`` keeps Liger's chunks).
bench/train_throughput.py measures the time (bench/README.md). ``WORKFLOW_LIGER_NOSYNC=0`` keeps
Liger's own functions (all three changes off). The two functions are rebuilt from their source
with those lines changed, so this applies only to the liger-kernel versions in ``TESTED`` and
only where the lines are found verbatim; elsewhere Liger's own code runs, with one warning line.
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap

from . import outside_tested, replace_attribute, warn

PATCH = "workflow.patches.liger_flce_nosync"
TESTED = {"liger_kernel": "==0.8.5"}
CONSEQUENCE = "Liger's fused linear cross-entropy waits for the GPU twice a step (~1-3% fewer rows/s on an H100)"
MODULE = "liger_kernel.ops.fused_linear_cross_entropy"

# (function, the line as Liger 0.8.5 has it, its replacement): indentation as in the source.
EDITS = (
    ("fused_linear_cross_entropy_forward",
     "    total_n_non_ignore = target_mask.sum().item()\n",
     "    if reduction == \"sum\" and ce_weight is None and not return_token_accuracy:\n"
     "        total_n_non_ignore = 1  # a sum never reads it (workflow.patches.liger_flce_nosync)\n"
     "    else:\n"
     "        total_n_non_ignore = target_mask.sum().item()\n"),
    ("fused_linear_cross_entropy_backward",
     "    if not torch.equal(grad_output, torch.tensor(1.0, device=grad_output.device)):\n",
     "    if True:  # multiply by grad_output even when it is 1.0 (workflow.patches.liger_flce_nosync)\n"),
)


# Larger logits chunks: Liger bounds each chunk of the LM head's logits to ~BT x H elements (28
# chunks of 256 rows for a 7,160-token Qwen2.5-7B micro-batch: small, slower matmuls). Here the
# bound is CHUNK_MEM times that (8: 4 chunks of 2,048 rows, +0.2 GiB peak measured; +2% rows/s on
# an H100, bench/README.md). Only how the rows are split changes (the rounding of the split-K
# matmul of the input gradient); WORKFLOW_LIGER_CHUNK_MEM=1 keeps Liger's chunks, =N sets N.
CHUNK_MEM = 8
CHUNK_LINE = "    inc_factor = triton.cdiv(V, chunk_mem_const * H)\n"


def _chunk_mem() -> int:
    try:
        return max(1, int(os.environ.get("WORKFLOW_LIGER_CHUNK_MEM", str(CHUNK_MEM))))
    except ValueError:
        return CHUNK_MEM


def _rebuilt(module, name: str, old: str, new: str):
    """``module.name`` compiled from its source with line ``old`` replaced by ``new``; None if not found."""
    function = getattr(module, name, None)
    if function is None or getattr(function, "_workflow_nosync", False):
        return None
    source = textwrap.dedent(inspect.getsource(function))
    if source.count(old) != 1:
        return None
    if name == EDITS[0][0] and _chunk_mem() > 1:
        if source.count(CHUNK_LINE) != 1:
            return None
        source = source.replace(CHUNK_LINE, CHUNK_LINE.replace("chunk_mem_const *", f"max(chunk_mem_const, {_chunk_mem()}) *"))
    namespace: dict = {}
    code = compile(source.replace(old, new), inspect.getsourcefile(function) or MODULE, "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - Liger's own source, one line changed
    rebuilt = namespace[name]
    rebuilt.__module__ = module.__name__
    rebuilt.__wrapped__ = function
    rebuilt._workflow_nosync = True
    return rebuilt


def apply(process_index: int = 0) -> bool:
    """Replace both functions in Liger's module (if it is imported); True if they are replaced now or already."""
    if os.environ.get("WORKFLOW_LIGER_NOSYNC", "1") == "0":
        return False
    module = sys.modules.get(MODULE)
    if module is None:  # Liger not in use
        return False
    if all(getattr(getattr(module, name, None), "_workflow_nosync", False) for name, _, _ in EDITS):
        return True
    problem = outside_tested(TESTED)
    if problem is None:
        rebuilt = {name: _rebuilt(module, name, old, new) for name, old, new in EDITS}
        if all(rebuilt.values()):
            for name, function in rebuilt.items():
                replace_attribute(module, name, function)
            return True
        problem = f"{MODULE} is not the source it was written against"
    if process_index == 0:
        warn(PATCH, f"{problem}; {CONSEQUENCE}")
    return False


def restore() -> None:
    """Liger's own functions back (tests)."""
    module = sys.modules.get(MODULE)
    for name, _, _ in EDITS:
        function = getattr(module, name, None) if module is not None else None
        if getattr(function, "_workflow_nosync", False):
            setattr(module, name, function.__wrapped__)
