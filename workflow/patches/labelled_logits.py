"""Supervised fine-tuning computes logits only where a label is: the LM head skips the prompt.

A causal LM's forward in transformers projects every position's hidden state onto the
vocabulary, then the loss ignores the positions labelled ``-100``. In SFT those are the
prompt's: on the CPU demo's ViGGO rows 206 of 230 tokens (the long instruction), so ~90% of
the LM head's matmul, of its backward and of the fp32 softmax over the vocabulary is thrown
away. With a 4,000-token vocabulary and a hidden size of 256 that head is a fifth of a LoRA
step's work on the CPU.

Here, in training, the model's forward runs the decoder as before, keeps the hidden states
of the positions whose next token is a target, projects those alone and hands the model's
own loss function the matching targets (``shift_labels``). The loss is the same sum over the
same predictions (mean, or sum over ``num_items_in_batch``, as transformers does), so the
gradients are too, up to the order of floating-point additions. ``outputs.logits`` is then
(N, vocab) for the N targets instead of (batch, length, vocab): nothing in the training step
reads it. Evaluation, generation and calls without labels take the model's own forward.

Used only where it is the same computation: an SFT stage, no loss function of LLaMA-Factory's
own (DFT/EAFT/ASFT read the full logits), a model class in ``ARCHITECTURES`` whose forward is
still transformers' (Liger's kernels replace it with a fused linear cross-entropy that never
builds the logits), and the versions in ``TESTED``. ``WORKFLOW_LABELLED_LOGITS=0`` turns it
off. bench/README.md ("CPU LoRA training") has the figures.
"""
from __future__ import annotations

import os
from typing import Any

from . import outside_tested, warn

PATCH = "workflow.patches.labelled_logits"
TESTED = {"llamafactory": "==0.9.5", "transformers": "==5.6.*"}
# Classes whose forward is exactly: decoder -> lm_head on the kept positions -> self.loss_function.
ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
OWN_LOSSES = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")
IGNORE_INDEX = -100


def why_not(model, llamafactory_args: dict[str, Any]) -> str | None:
    """None when the labelled-positions forward computes what the model's own would; else the reason."""
    if os.environ.get("WORKFLOW_LABELLED_LOGITS", "1") == "0":
        return "WORKFLOW_LABELLED_LOGITS=0"
    if llamafactory_args.get("stage", "sft") != "sft":
        return f"stage {llamafactory_args.get('stage')}, not sft"
    own = [key for key in OWN_LOSSES if llamafactory_args.get(key)]
    if own:
        return f"{own[0]} reads the logits of every position"
    problem = outside_tested(TESTED)
    if problem:
        return f"{PATCH} not applied: {problem}"
    cls = type(model)
    if cls.__name__ not in ARCHITECTURES:
        return f"{cls.__name__} is not one of {', '.join(ARCHITECTURES)}"
    if cls.forward.__module__ != cls.__module__:
        return f"{cls.__name__}.forward is {cls.forward.__module__}'s (Liger's fused cross-entropy builds no logits)"
    return None


def labelled_forward(model):
    """The forward ``model`` (a causal LM of ``ARCHITECTURES``) gets in training: logits at targets only."""
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    own = type(model).forward.__get__(model)

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None or not model.training or not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            return own(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                       use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                              **kwargs)
        # Position t predicts token t + 1 (transformers' ForCausalLMLoss shifts the same way).
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        kept = targets != IGNORE_INDEX
        logits = model.lm_head(outputs.last_hidden_state[kept])
        loss = model.loss_function(logits=logits, labels=None, shift_labels=targets[kept],
                                   vocab_size=model.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    return forward


def causal_lm(model):
    """The transformers causal LM inside PEFT's wrappers (the model itself without them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def labelled_logits_callback(llamafactory_args: dict[str, Any]):
    """A Hugging Face callback that gives the causal LM the labelled-positions forward while it trains."""
    from transformers import TrainerCallback

    class LabelledLogits(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            lm = causal_lm(model)
            reason = why_not(lm, llamafactory_args)
            if reason and reason.startswith(PATCH) and args.process_index == 0:
                warn(PATCH, f"{reason.split(': ', 1)[1]}; the LM head computes the prompt's logits too")
            if reason is None:
                lm.forward = labelled_forward(lm)
                self.patched = lm

        def on_train_end(self, args, state, control, **kwargs):
            lm = getattr(self, "patched", None)
            if lm is not None:
                del lm.forward  # the class's forward again
                self.patched = None

    return LabelledLogits()
