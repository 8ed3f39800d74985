"""Neat packing without padding or attention masks: packed rows through FlashAttention varlen.

With ``packing`` + ``neat_packing`` and ``flash_attn: sdpa``, LLaMA-Factory pads every pack
to ``cutoff_len + 1`` (then to a multiple of 8) and hands SDPA a block-diagonal (B, 1, S, S)
mask so that rows in a pack do not attend to each other. On a GPU that costs twice: the padding (~13% of the positions of a
ViGGO pack) goes through every matmul of the model, and masked SDPA runs a slower kernel than
causal attention. LLaMA-Factory unpads only for ``flash_attention_2``, which needs the
flash-attn package (a source build).

Here the train stage drops the padding and the mask instead: the micro-batch's real tokens
become one (1, T) row and each packed example one segment of ``cu_seq_lens``, attended
causally by ``torch.nn.attention.varlen.varlen_attn`` (the FlashAttention kernel shipped in
torch). Rows see exactly what the mask let them see, positions restart per row as before,
and the loss sums over the same predictions: a pack's last token is now followed by the next
pack's first token instead of padding, so that token is made no target.

Used only where it is the same computation: CUDA, torch with ``varlen_attn``, LLaMA-Factory's
neat-packing collator with SDPA, a text-only model, no attention dropout and no sliding window.
``WORKFLOW_VARLEN_PACKING=0`` keeps LLaMA-Factory's masked path. bench/train_throughput.py
measures both (bench/README.md). It replaces the collator of the trainer's loader and reads
attributes of LLaMA-Factory's collator, so it is used only with the versions in ``TESTED``;
elsewhere LLaMA-Factory's masked path runs, and rank 0 says why in one line.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.console import say
from . import outside_tested

PATCH = "workflow.patches.packed_attention"
TESTED = {"llamafactory": "==0.9.5", "transformers": "==5.6.*", "torch": ">=2.11,<2.12"}
ATTENTION_NAME = "workflow_packed_varlen"
IGNORE_INDEX = -100  # the label the loss skips (LLaMA-Factory and transformers)


def flatten_packed_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """One (1, T) row of a neat-packed batch's real tokens, with the rows' boundaries.

    ``batch["attention_mask"]`` is LLaMA-Factory's (B, S) index mask: 1, 2, ... for the
    examples of a pack, 0 for padding. Every (B, S) tensor keeps its non-padding positions,
    the first token of each pack stops being a target, and the mask becomes
    ``cu_seq_lens_q``/``_k`` (int32 offsets of each example, FlashAttention style) and
    ``max_length_q``/``_k``: the keyword arguments transformers passes to the attention function.
    """
    import torch

    segment_ids = batch.pop("attention_mask")
    rows, length = segment_ids.shape
    keep = segment_ids.reshape(-1) != 0
    for key, value in batch.items():
        if torch.is_tensor(value) and value.shape[:2] == (rows, length):
            batch[key] = value.reshape(1, rows * length, *value.shape[2:])[:, keep]
    # An example starts where the index changes or a new pack begins (two packs of one
    # example each carry the same index 1).
    row_of = torch.arange(rows).repeat_interleave(length)[keep]
    ids = segment_ids.reshape(-1)[keep]
    pack_starts = torch.ones_like(ids, dtype=torch.bool)
    pack_starts[1:] = row_of[1:] != row_of[:-1]
    starts = pack_starts.clone()
    starts[1:] |= ids[1:] != ids[:-1]
    offsets = torch.cat([starts.nonzero().flatten(), torch.tensor([ids.numel()])]).to(torch.int32)
    if "labels" in batch:
        # A pack's first token began a row, so nothing predicted it; now it follows the previous
        # pack's last token, which must not learn to predict it.
        batch["labels"][0, pack_starts] = IGNORE_INDEX
    longest = int((offsets[1:] - offsets[:-1]).max()) if ids.numel() else 0
    batch.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest)
    return batch


@dataclass
class PackedVarlenCollator:
    """LLaMA-Factory's collator (block-diagonal 4-D mask off), then ``flatten_packed_batch``."""

    collate: Callable[[list], dict]

    def __call__(self, features: list) -> dict:
        return flatten_packed_batch(self.collate(features))


def packed_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                            max_length_q: int | None = None, max_length_k: int | None = None, **kwargs):
    """A transformers attention function: causal attention within each ``cu_seq_lens`` segment.

    Batches without segments (an evaluation batch, with LLaMA-Factory's 4-D mask) go to SDPA.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                      scale=scaling, window_size=(-1, 0))
    return out.view(batch, length, heads, head_dim), None


def why_not_varlen(model, collate_fn) -> str | None:
    """None when packed varlen attention computes what LLaMA-Factory would; else the reason."""
    import torch

    if os.environ.get("WORKFLOW_VARLEN_PACKING", "1") == "0":
        return "WORKFLOW_VARLEN_PACKING=0"
    if not getattr(collate_fn, "neat_packing", False) or not getattr(collate_fn, "block_diag_attn", False):
        return "not neat packing"
    problem = outside_tested(TESTED)
    if problem:
        return f"{PATCH} not applied: {problem}"
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    config = model.config
    if getattr(config, "sub_configs", None) or getattr(collate_fn, "get_rope_func", None) is not None:
        return "a multimodal model (vision towers and 3-D position ids are not flattened)"
    if config._attn_implementation != "sdpa" or collate_fn.attn_implementation != "sdpa":
        return f"attention is {config._attn_implementation}, not sdpa"
    if not next(model.parameters()).is_cuda:
        return "not on a CUDA GPU"
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "use_sliding_window", False):
        return "attention dropout or sliding window"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "not every layer has full attention"
    return None


def packed_attention_callback():
    """A Hugging Face callback that switches neat packing to ``PackedVarlenCollator`` + varlen attention."""
    from transformers import AttentionInterface, TrainerCallback

    class PackedVarlen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            if model is None or train_dataloader is None:
                return
            reason = why_not_varlen(model, train_dataloader.collate_fn)
            if args.process_index == 0 and reason != "not neat packing":
                say("[training] neat packing: " + (f"LLaMA-Factory's padded packs and masked attention ({reason})"
                                                   if reason else "padding dropped, FlashAttention varlen"))
            if reason:
                return
            collate = copy.copy(train_dataloader.collate_fn)  # the evaluation loader keeps its masks
            collate.block_diag_attn = False
            wrapped = PackedVarlenCollator(collate)
            # Accelerate's loader iterates a plain DataLoader it holds (and copies its own
            # attribute when it skips batches on resume): set both.
            train_dataloader.collate_fn = wrapped
            if hasattr(train_dataloader, "base_dataloader"):
                train_dataloader.base_dataloader.collate_fn = wrapped
            AttentionInterface.register(ATTENTION_NAME, packed_varlen_attention)
            self.previous = model.config._attn_implementation
            model.config._attn_implementation = ATTENTION_NAME

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None and getattr(self, "previous", None):
                model.config._attn_implementation = self.previous

    return PackedVarlen()
