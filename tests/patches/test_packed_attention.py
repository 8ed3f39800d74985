"""workflow.packed_attention: neat-packed batches without padding, attended by FlashAttention varlen.

The batch flattening runs anywhere. The attention itself needs CUDA (``varlen_attn`` is a
FlashAttention kernel): those tests are skipped on this CPU machine and were run on the GPU
machine (bench/README.md says when); CI has no GPU.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

from workflow.patches.packed_attention import IGNORE_INDEX, flatten_packed_batch  # noqa: E402

needs_varlen_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None,
    reason="varlen_attn is a CUDA kernel: run on a GPU machine")


def packed_batch(segment_ids: list[list[int]]) -> dict:
    """A LLaMA-Factory-like neat-packed batch: ids 1, 2, ... per example, 0 for padding."""
    mask = torch.tensor(segment_ids)
    positions = torch.zeros_like(mask)
    for r, row in enumerate(segment_ids):
        for c in range(1, len(row)):
            positions[r, c] = positions[r, c - 1] + 1 if row[c] == row[c - 1] and row[c] else 0
    rows, length = mask.shape
    return {"input_ids": torch.arange(rows * length).view(rows, length) + 100, "attention_mask": mask,
            "position_ids": positions, "labels": torch.arange(rows * length).view(rows, length) + 1000}


def test_flatten_keeps_real_tokens_in_order_with_each_examples_offsets():
    batch = flatten_packed_batch(packed_batch([[1, 1, 1, 2, 2, 0, 0, 0],
                                               [1, 1, 1, 1, 2, 0, 0, 0]]))
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[100, 101, 102, 103, 104, 108, 109, 110, 111, 112]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    # Only each pack's first token stops being a target: it now follows the previous pack.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 1001, 1002, 1003, 1004,
                                         IGNORE_INDEX, 1009, 1010, 1011, 1012]]


def test_packs_of_one_example_each_stay_separate_examples():
    """Both packs call their example 1: the pack boundary still starts a new one."""
    batch = flatten_packed_batch(packed_batch([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == 4


@pytest.mark.gpu
@needs_varlen_gpu
@pytest.mark.train_env
def test_varlen_attention_matches_sdpa_with_llamafactorys_block_mask():
    """Outputs and gradients of the padded, masked path (LLaMA-Factory + SDPA) at every real position."""
    from llamafactory.data.collator import prepare_4d_attention_mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from workflow.patches.packed_attention import packed_varlen_attention

    torch.manual_seed(0)
    segment_ids = [[1] * 70 + [2] * 130 + [3] * 40 + [0] * 16, [1] * 200 + [2] * 50 + [0] * 6]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 4, True
    heads, kv_heads, head_dim = 8, 2, 64
    rows, length = len(segment_ids), len(segment_ids[0])
    q = torch.randn(rows, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(rows, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(rows, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask_ids = torch.tensor(segment_ids)
    real = (mask_ids != 0).cuda()
    mask = prepare_4d_attention_mask(mask_ids, torch.bfloat16).cuda()
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=head_dim**-0.5)
    expected_grads = torch.autograd.grad(expected[real].float().square().sum(), (q, k, v))

    flat = flatten_packed_batch({"attention_mask": mask_ids})
    # The same tokens as the model's (1, T) row would hold them: (B, H, S, D) -> (1, H, T, D).
    q1, k1, v1 = (t.transpose(1, 2).reshape(1, rows * length, t.shape[1], head_dim)[:, real.reshape(-1)]
                  .transpose(1, 2) for t in (q, k, v))
    got, _ = packed_varlen_attention(module, q1, k1, v1, None, scaling=head_dim**-0.5,
                                     cu_seq_lens_q=flat["cu_seq_lens_q"].cuda(),
                                     cu_seq_lens_k=flat["cu_seq_lens_k"].cuda(),
                                     max_length_q=flat["max_length_q"], max_length_k=flat["max_length_k"])
    assert got.shape == (1, int(real.sum()), heads, head_dim)
    torch.testing.assert_close(got[0], expected[real], atol=2e-2, rtol=2e-2)
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    for want, have in zip(expected_grads, got_grads):
        torch.testing.assert_close(have, want, atol=5e-2, rtol=5e-2)


def _segment_sdpa(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """A CPU stand-in for ``varlen_attn`` (a CUDA-only kernel): causal SDPA per segment."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k)
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        assert end - start <= max_q
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0), is_causal=True, scale=scale,
        ).transpose(0, 1)
    return out


@pytest.mark.heavy
@pytest.mark.train_env
def test_llamafactory_training_on_flattened_packs_matches_its_masked_packs(tiny_model, viggo_alpaca, tmp_path,
                                                                          monkeypatch):
    """The callback's whole path through LLaMA-Factory's trainer, PEFT and transformers, on the CPU.

    Mocked, because it cannot run here: the CUDA kernel (``varlen_attn`` -> per-segment SDPA)
    and the CUDA check. Everything else is the train stage's: LLaMA-Factory's neat-packing
    collator, the flattening, the attention function behind transformers' interface. The
    losses must be those of LLaMA-Factory's own padded, block-masked SDPA batches.
    """
    import torch.nn.attention.varlen as varlen
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    import workflow.patches.packed_attention as packed
    from workflow.training.llamafactory_args import llamafactory_args

    seen = []

    def stand_in(*args, **kwargs):
        seen.append(args[0].shape)
        return _segment_sdpa(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    refusal = packed.why_not_varlen
    monkeypatch.setattr(packed, "why_not_varlen",
                        lambda model, collate: None if refusal(model, collate) == "not on a CUDA GPU" else "?")

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    def train(name: str, callbacks: list) -> list[float]:
        losses = Losses()
        args = llamafactory_args(
            {"stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "template": "qwen",
             "cutoff_len": 512, "max_samples": 64, "overwrite_cache": True, "packing": True, "neat_packing": True,
             "flash_attn": "sdpa", "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
             "learning_rate": 1e-3, "report_to": "none", "use_cpu": True, "save_strategy": "no", "seed": 0},
            model=str(tiny_model), dataset_dir=str(viggo_alpaca), output_dir=str(tmp_path / name))
        run_exp(args=args, callbacks=[*callbacks, losses])
        return losses.losses

    masked = train("masked", [])
    assert not seen
    flattened = train("flattened", [packed.packed_attention_callback()])
    assert seen and all(shape[0] < 4 * 512 for shape in seen)  # (T, heads, head_dim): padding gone
    assert len(masked) == len(flattened) == 3
    assert flattened == pytest.approx(masked, rel=1e-4)
