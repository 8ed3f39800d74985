"""A faster LoRA layer for training: PEFT's ``Linear.forward`` with two passes fewer.

Applied by a Hugging Face callback that the train stage adds to LLaMA-Factory's run, only
with the PEFT versions in ``TESTED`` (it replaces forward methods and flags of PEFT's LoRA
layers); elsewhere PEFT's own forward runs, with one warning line.
"""

from __future__ import annotations

import os

from . import outside_tested, warn

PATCH = "workflow.patches.peft_lora_fast_path"
TESTED = {"peft": "==0.18.*"}
CONSEQUENCE = "PEFT's own LoRA forward runs (same results, ~13% fewer rows/s on an H100)"


def _fused_lora_linear_forward(self, x, *args, **kwargs):
    """PEFT's LoRA ``Linear.forward`` for one adapter without dropout, in fewer passes.

    PEFT computes ``result + lora_B(lora_A(x)) * scaling``: an output-sized multiply and add
    forward and another multiply backward, for each of the 196 adapted projections of a 7B
    model. Here the scaling goes into lora_B's (tiny) weight and the add into the matmul's
    epilogue (``torch.addmm``), the same sum up to rounding. Anything else (adapters off or
    merged, several adapters, mixed batches) takes PEFT's own path.
    """
    import torch

    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(self.active_adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    (name,) = self.active_adapters
    result = self.base_layer(x, *args, **kwargs)
    low_rank = self.lora_A[name](x)
    weight_b = self.lora_B[name].weight * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), weight_b.t())
    return out.view(result.shape)


def lora_fast_path_callback():
    """A Hugging Face callback that takes two avoidable passes out of every LoRA layer.

    1. PEFT keeps adapter weights in fp32 and casts each adapted layer's input to that dtype
       before the LoRA matmuls; under bf16/fp16 autocast those matmuls cast it straight back,
       so every adapted projection paid two activation-sized copies forward and two backward
       for an identical result (17% of the GPU time of a Qwen2.5-7B step). Under autocast the
       input stays in the autocast dtype; the weights stay fp32 (the optimizer's copy).
    2. Plain LoRA layers (one adapter, no dropout, no DoRA-like variant, inputs and weights of
       one dtype or autocast on) run ``_fused_lora_linear_forward``.

    ``WORKFLOW_FUSED_LORA=0`` keeps PEFT's own forward (both changes off).
    bench/train_throughput.py measures both (bench/README.md).
    """
    from transformers import TrainerCallback

    class LoraFastPath(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None or os.environ.get("WORKFLOW_FUSED_LORA", "1") == "0":
                return
            problem = outside_tested(TESTED)
            if problem:
                if args.process_index == 0:
                    warn(PATCH, f"{problem}; {CONSEQUENCE}")
                return
            import torch
            from peft.tuners.lora import Linear as LoraLinear

            autocast = bool(args.bf16 or args.fp16)
            for module in model.modules():
                if not isinstance(module, LoraLinear):
                    continue
                if autocast:
                    module.cast_input_dtype_enabled = False
                plain = (len(module.lora_A) == 1 and not module.lora_variant
                         and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()))
                same_dtype = all(module.get_base_layer().weight.dtype == a.weight.dtype for a in module.lora_A.values())
                if plain and (autocast or same_dtype) and not hasattr(module, "_peft_forward"):
                    module._peft_forward = module.forward
                    module.forward = _fused_lora_linear_forward.__get__(module)

    return LoraFastPath()
