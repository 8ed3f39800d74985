"""LoRA training throughput on one GPU: the reference tutorial's settings against the fast recipe's.

Both runs go through the train stage's own argument builder
(``workflow.training.llamafactory_args.llamafactory_args``) over the ``train.llamafactory`` sections of
``recipes/viggo-qwen2.5-7b.yaml`` (reference) and ``recipes/viggo-qwen2.5-7b-fast.yaml``
(fast), and LLaMA-Factory's ``run_exp`` in one process per run, one after the other on the
same GPU. Ray Train cannot be carried to the GPU machines, so the bench changes only what
one process on one GPU without Ray and a hub needs (``BENCH_OVERRIDES``, printed with every
run): the data, the model and output paths, one epoch over ``--rows`` rows, no checkpoints,
no TensorBoard, no evaluation, no DDP backend. The loss of every step (the loss curve) is
read by the bench without logging it, so the recipe's ``logging_steps`` stays as it is.

The model has Qwen2.5-7B-Instruct's exact configuration (vocab 152064 included) and random
weights, built on the GPU; the tokenizer is a byte-level BPE trained on the ViGGO rows
(``workflow.training.tiny_model.train_tokenizer``), so every token count below is by that tokenizer.

Measured per run, in steady state (the optimizer steps after the first ``--skip`` fraction,
at least 2): rows/s, tokens/s (tokens the model saw, padding excluded), MFU; over the whole
run: peak GPU memory (``torch.cuda.max_memory_allocated``), the loss at every step against the
tokens seen so far.

MFU = model FLOPs per second / 989e12 (H100 SXM dense bf16 peak). Model FLOPs of LoRA with a
frozen base, per row of n tokens: ``4 * N * n`` (forward 2N, backward through the frozen
weights 2N for the activation gradients, no weight gradients) with N the parameters of every
matrix the tokens pass through (all linear layers of the 28 blocks and the LM head; the
embedding lookup is no matmul), plus causal attention inside the row, ``6 * L * H * d * n^2``
(QK^T and AV forward over the lower triangle, twice that backward). The LoRA matrices
(0.3% of N), recomputation by gradient checkpointing and attention across rows in a pack are
not model FLOPs: they count as waste.

Usage, on a GPU machine with the wheels of bench/README.md on PYTHONPATH::

    python bench/train_throughput.py [--out FILE.json] [--rows 800] [--variants reference,fast]
        [--try 'NAME=BASE:key=value,key=value' ...]

``--try`` adds a variant: a named recipe's LLaMA-Factory keys with some keys changed. Writes
``bench/results/train_throughput/<machine>.json`` (bench/record.py; ``--out FILE`` to override) and every
step of every run beside it (``.raw.json``); ``--profile`` and ``--sync-debug`` write into ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (bench/record.py: this script's folder is on the path)
import yaml  # noqa: E402

from workflow.config import load_recipe  # noqa: E402
from workflow.patches.packed_attention import packed_attention_callback  # noqa: E402
from workflow.patches.peft_lora_fast_path import lora_fast_path_callback  # noqa: E402
from workflow.training.llamafactory_args import llamafactory_args  # noqa: E402
from workflow.training.ray_train import WORKER_ENV_DEFAULTS  # noqa: E402

RECIPES = {"reference": REPO / "recipes" / "viggo-qwen2.5-7b.yaml",
           "fast": REPO / "recipes" / "viggo-qwen2.5-7b-fast.yaml"}
VIGGO_TRAIN = REPO / "data" / "viggo" / "train.csv"
PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
# What one process on one GPU, without Ray or a hub, has to change in the train stage's arguments.
BENCH_OVERRIDES: dict[str, Any] = {
    "num_train_epochs": 1,          # one pass over --rows rows
    "save_strategy": "no",          # no checkpoints of a random model
    "report_to": "none",            # no TensorBoard on the GPU machine
    "plot_loss": False,
    "eval_strategy": "no",          # training throughput only
    "overwrite_output_dir": True,
    "overwrite_cache": True,
}
DROPPED_KEYS = ("ddp_backend", "ddp_timeout", "eval_steps", "per_device_eval_batch_size", "max_samples",
                "resume_from_checkpoint")  # one process, no evaluation; --rows sets the data
# --try keys that are no LLaMA-Factory arguments, to measure what the train stage's own callbacks
# save: peft_lora_forward=true runs without lora_fast_path_callback (PEFT's own LoRA forward),
# sdpa_neat_packing=true without packed_attention_callback (padded packs, SDPA with a 4-D mask).
# A key env.NAME=VALUE sets the environment variable NAME for that variant's process (the patches'
# switches: env.WORKFLOW_LORA_GROUPS=0, ...).
BENCH_ONLY_KEYS = ("peft_lora_forward", "sdpa_neat_packing")
PROFILE_STEPS = (5, 7)  # --profile: the optimizer steps 6 and 7, by kernel
TOKENIZER_VOCAB = 8000  # an upper bound: BPE on 800 ViGGO rows stops at ~3.1k tokens, ~235 per templated row


def qwen25_7b_config(tokenizer):
    """Qwen2.5-7B-Instruct's config.json, with the special-token ids of our tokenizer."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
        max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
        use_sliding_window=False, tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02,
        use_cache=True, torch_dtype="bfloat16",
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def prepare(work: Path, rows: int) -> tuple[Path, Path]:
    """The first ``rows`` ViGGO training rows as Alpaca JSONL, a tokenizer, and the random 7B model."""
    import torch
    from transformers import Qwen2ForCausalLM

    from workflow.training.tiny_model import train_tokenizer

    instruction = load_recipe(REPO / "recipes" / "viggo-cpu.yaml").ingest.instruction
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(VIGGO_TRAIN, newline="") as f, open(data / "train.jsonl", "w") as g:
        for i, row in enumerate(csv.DictReader(f)):
            if i == rows:
                break
            g.write(json.dumps({"instruction": instruction, "input": row["ref"], "output": row["mr"]}) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({"train": {
        "file_name": "train.jsonl", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))

    model = work / "qwen2.5-7b-random"
    if not (model / "config.json").exists():
        started = time.monotonic()
        tokenizer = train_tokenizer([data / "train.jsonl"], TOKENIZER_VOCAB)
        config = qwen25_7b_config(tokenizer)
        torch.manual_seed(0)
        with torch.device("cuda"):
            net = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
        net.save_pretrained(model)
        tokenizer.save_pretrained(model)
        n = sum(p.numel() for p in net.parameters())
        del net
        torch.cuda.empty_cache()
        print(f"[bench] built {model.name}: {n / 1e9:.2f} B parameters, tokenizer of {len(tokenizer)} tokens, "
              f"{time.monotonic() - started:.0f} s", flush=True)
    return data, model


def matmul_params(config) -> int:
    """N of the MFU formula: the parameters of every matrix a token is multiplied by."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k, v, o, gate, up, down
    return L * per_layer + h * config.vocab_size        # + LM head


def model_flops(config, tokens: float, sum_sq: float) -> float:
    """4·N·tokens + 6·L·H·d·Σn² (see the module docstring)."""
    d = config.hidden_size // config.num_attention_heads
    return 4 * matmul_params(config) * tokens + 6 * config.num_hidden_layers * config.num_attention_heads * d * sum_sq


# ---------------------------------------------------------------- one run (a child process)

SYNC_DEBUG_STEPS = (3, 5)  # --sync-debug: the optimizer steps 4 and 5


class _SyncLog:
    """Every synchronizing CUDA call while on (``torch.cuda.set_sync_debug_mode("warn")``), by call site."""

    def __init__(self):
        self.sites: dict[str, int] = {}
        self.total = 0
        self._previous = None

    def start(self):
        import warnings

        import torch

        self._previous = warnings.showwarning
        self._filters = list(warnings.filters)
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self):
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._previous
        warnings.filters[:] = self._filters

    def _record(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        if "synchroniz" not in str(message):
            return self._previous(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        site = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                           for f in frames[-4:][::-1])
        self.sites[site] = self.sites.get(site, 0) + 1
        self.total += 1

    def report(self, steps: int) -> str:
        lines = [f"{self.total} synchronizing CUDA calls in {steps} optimizer steps, by call site (innermost first):"]
        lines += [f"  {n:5d}  {site}" for site, n in sorted(self.sites.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines) + "\n"


def _meter(profile_to: str | None = None, syncs_to: str | None = None):
    """A Trainer callback that times every optimizer step and counts what the model saw in it.

    Nothing in it makes the host wait for the GPU during training (a wait per step would
    leave the GPU idle while the host prepares the next one, which the train stage does not
    do): a CUDA event marks each step's end on the GPU's timeline, a forward pre-hook adds
    up the tokens (padding excluded), the rows (positions equal to 0) and Σn² over rows
    (Σ(2p+1) over positions p) on the GPU, and the loss Hugging Face's Trainer accumulates
    is kept per step as a GPU tensor (``training_step``'s return value; the logged loss of
    a step is their sum). All of it is read once, when training ends.
    """
    import torch
    from transformers import Trainer, TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.pending: list[tuple] = []
            self.profiler = None
            self.profiled = False
            self.sync_log = None

        def on_step_begin(self, args, state, control, **kwargs):
            if syncs_to and state.global_step == SYNC_DEBUG_STEPS[0]:
                self.sync_log = _SyncLog()
                self.sync_log.start()
                self.profiled = True
            if profile_to and state.global_step == PROFILE_STEPS[0]:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
                self.profiled = True

        def _count(self, module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None:
                return
            real = ids != self.pad_id
            pos = kwargs.get("position_ids")
            if pos is None or pos.shape != ids.shape:
                pos = real.long().cumsum(-1) - 1
            real_pos = torch.where(real, pos, -1)
            self.counts += torch.stack([real.sum(), (real_pos == 0).sum(), (2 * real_pos + 1).clamp(min=0).sum()])

        def add_loss(self, loss):
            self.loss += loss.detach().float()

        def _mark(self):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            self.pad_id = processing_class.pad_token_id
            self.counts = torch.zeros(3, dtype=torch.long, device="cuda")
            self.loss = torch.zeros((), device="cuda")
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.last = self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._mark()
            self.pending.append((state.global_step, self.last, end, self.counts.clone(), self.loss.clone(),
                                 self.profiled))
            self.counts.zero_()
            self.loss.zero_()
            if self.profiler is not None and state.global_step == PROFILE_STEPS[1]:
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=45)
                trace = Path(profile_to).with_suffix(".trace.json")
                self.profiler.export_chrome_trace(str(trace))
                Path(profile_to).write_text(table + "\n" + gpu_idle_report(trace))
                trace.unlink()
                self.profiler = None
            elif self.sync_log is not None and state.global_step == SYNC_DEBUG_STEPS[1]:
                self.sync_log.stop()
                Path(syncs_to).write_text(self.sync_log.report(SYNC_DEBUG_STEPS[1] - SYNC_DEBUG_STEPS[0]))
                self.sync_log = None
                self.profiled = False
            else:  # the step after the profiled ones waited for the trace export: left out as well
                self.profiled = self.profiler is not None or self.sync_log is not None
            self.last = end

        def on_train_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            for step, begin, end, counts, loss, profiled in self.pending:
                tokens, rows, sum_sq = counts.tolist()
                self.steps.append({"step": step, "seconds": begin.elapsed_time(end) / 1000, "tokens": tokens,
                                   "rows": rows, "sum_sq": sum_sq, "loss": loss.item(), "profiled": profiled})
            self.pending.clear()

    meter = Meter()
    training_step = Trainer.training_step

    def training_step_kept(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        meter.add_loss(loss)
        return loss

    Trainer.training_step = training_step_kept  # this child process runs one variant only
    return meter


def gpu_idle_report(trace_path: Path, top: int = 15) -> str:
    """Where the GPU waited in a profiled trace: idle time between kernels, by the CPU op that
    launched the kernel after each gap and by the annotated region (optimizer step, data
    loading, ...) the CPU was in when the gap began. (Without Python stacks: recording them
    slows Python-heavy code such as Triton's launcher enough to invent gaps.)"""
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    cpu_ops = {e["args"].get("External id"): e["name"] for e in events
               if e.get("ph") == "X" and e.get("cat") == "cpu_op" and "args" in e}
    regions = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("user_annotation", "python_function")]
    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    by_op, by_region = {}, {}
    for prev, nxt in zip(kernels, kernels[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 5:
            continue
        op = cpu_ops.get(nxt.get("args", {}).get("External id"), "?")
        by_op[op] = by_op.get(op, 0) + gap
        start = prev["ts"] + prev["dur"]
        inside = [r for r in regions if r["ts"] <= start <= r["ts"] + r["dur"]]
        label = min(inside, key=lambda r: r["dur"])["name"] if inside else "(none)"
        by_region[label] = by_region.get(label, 0) + gap
    lines = [f"GPU busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms ({busy / span:.1%}); idle {(span - busy) / 1e3:.1f} ms",
             "idle before kernels launched by (ms):"]
    lines += [f"  {v / 1e3:8.2f}  {k[:90]}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    lines.append("idle while the CPU was in (innermost annotated region, ms):")
    lines += [f"  {v / 1e3:8.2f}  {k[:90]}" for k, v in sorted(by_region.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"


def run_one(spec: dict) -> dict:
    """Train one variant with LLaMA-Factory in this process; return its measurements."""
    import torch
    from llamafactory.train.tuner import run_exp

    meter = _meter(spec.get("profile_to"), spec.get("syncs_to"))
    # The train stage's own callbacks that change the computation (the others report to Ray).
    callbacks = [meter]
    if not spec["bench_only"].get("peft_lora_forward"):
        callbacks.append(lora_fast_path_callback())
    if not spec["bench_only"].get("sdpa_neat_packing"):
        callbacks.append(packed_attention_callback())
    started = time.monotonic()
    run_exp(args=spec["args"], callbacks=callbacks)
    wall = time.monotonic() - started
    return {"steps": meter.steps, "wall_s": wall, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name()}


# ---------------------------------------------------------------- the driver

def parse_try(text: str) -> tuple[str, str, dict]:
    """``NAME=BASE:key=value,key=value`` -> (name, base, changes); values are YAML scalars."""
    name, _, rest = text.partition("=")
    base, _, pairs = rest.partition(":")
    changes = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 4e-4 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        changes[key.strip()] = parsed
    return name.strip(), base.strip(), changes


def load_train_recipe(path: Path):
    """The recipe, for its ``train`` section: the GPU recipes require ``WORKFLOW_STORAGE``, where the bench stores
    nothing, so an unset one is filled in for the load only."""
    unset = "WORKFLOW_STORAGE" not in os.environ
    if unset:
        os.environ["WORKFLOW_STORAGE"] = "/tmp/train-throughput/storage"
    try:
        return load_recipe(path)
    finally:
        if unset:
            del os.environ["WORKFLOW_STORAGE"]


def variant_args(base: str, changes: dict, *, data: Path, model: Path, output: Path) -> tuple[dict, dict]:
    """The train stage's arguments for a recipe (plus ``changes``), with the bench's overrides."""
    recipe = load_train_recipe(RECIPES[base])
    if recipe.train is None:
        raise SystemExit(f"{RECIPES[base]}: no train section yet")
    section = {**recipe.train.llamafactory, **changes}
    args = llamafactory_args(section, model=str(model), dataset_dir=str(data), output_dir=str(output))
    dropped = {k: args.pop(k) for k in DROPPED_KEYS if k in args}
    args.update(BENCH_OVERRIDES)
    return args, dropped


def summarize(name: str, result: dict, config, skip: float) -> dict:
    steps = result["steps"]
    first = max(2, int(len(steps) * skip))
    steady = [s for s in steps[first:] if not s.get("profiled")] or steps  # a profiled step runs slower
    seconds = sum(s["seconds"] for s in steady)
    tokens = sum(s["tokens"] for s in steady)
    rows = sum(s["rows"] for s in steady)
    flops = model_flops(config, tokens, sum(s["sum_sq"] for s in steady))
    all_tokens = sum(s["tokens"] for s in steps)
    losses = [(s["tokens"], s["loss"]) for s in steps if "loss" in s]
    # Mean loss over the last quarter of the tokens seen: the comparison at equal tokens.
    seen, tail = 0, []
    for tok, loss in losses:
        seen += tok
        if seen > 0.75 * all_tokens:
            tail.append(loss)
    step_seconds = sorted(s["seconds"] for s in steady)
    return {
        "variant": name, "optimizer_steps": len(steps), "steady_steps": len(steady),
        "rows_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
        "median_step_s": step_seconds[len(step_seconds) // 2], "slowest_step_s": step_seconds[-1],
        "mfu": flops / seconds / PEAK_FLOPS, "tokens_per_row": tokens / max(rows, 1),
        "tokens_per_step": all_tokens / len(steps), "rows_total": sum(s["rows"] for s in steps),
        "tokens_total": all_tokens, "run_wall_s": result["wall_s"],
        "peak_allocated_gib": result["peak_allocated_gib"], "peak_reserved_gib": result["peak_reserved_gib"],
        "final_loss": losses[-1][1] if losses else None,
        "last_quarter_loss": sum(tail) / len(tail) if tail else None,
    }


def report_table(summaries: list[dict], results: dict, config, rows: int) -> str:
    """The runs as a Markdown table, for the console."""
    ok = [s for s in summaries if "failed" not in s]
    ref = next((s for s in ok if s["variant"] == "reference"), None)
    gpu = next(iter(results.values()))["gpu"] if results else "?"
    lines = [f"{gpu}, {rows} ViGGO rows, 1 epoch, N = {matmul_params(config) / 1e9:.2f} B matmul params",
             "| variant | changes | rows/s | tokens/s | MFU | x ref | peak GiB | steps | last-quarter loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if "failed" in s:
            lines.append(f"| {s['variant']} | | failed: {s['failed']} | | | | | | |")
            continue
        speedup = f"{s['rows_per_s'] / ref['rows_per_s']:.1f}" if ref else "-"
        changes = ", ".join(f"{k}={v}" for k, v in s["changes"].items()) or f"({s['base']} recipe)"
        lines.append(f"| {s['variant']} | {changes} | {s['rows_per_s']:.1f} | {s['tokens_per_s']:.0f} | "
                     f"{s['mfu']:.1%} | {speedup} | {s['peak_allocated_gib']:.1f} | {s['optimizer_steps']} | "
                     f"{s['last_quarter_loss']:.4f} |")
    return "\n".join(lines)


def figures(summaries: list[dict], rows: int) -> dict:
    """The quoted figures: the fast recipe's (the variant ``fast``, else the first that ran), the reference's
    when it ran beside it, and every variant's rows/s, MFU and loss."""
    ok = [s for s in summaries if "failed" not in s]
    fast = next((s for s in ok if s["variant"] == "fast"), next((s for s in ok if s["variant"] != "reference"), None))
    ref = next((s for s in ok if s["variant"] == "reference"), None)
    out: dict = {"variant": fast and fast["variant"], "rows": rows}
    if fast:
        out.update(mfu=round(fast["mfu"], 4), rows_per_s=round(fast["rows_per_s"], 2),
                   tokens_per_s=round(fast["tokens_per_s"]), loss=round(fast["last_quarter_loss"], 4),
                   peak_gib=round(fast["peak_allocated_gib"], 1), median_step_s=round(fast["median_step_s"], 3))
    if ref:
        out.update(reference_rows_per_s=round(ref["rows_per_s"], 2), reference_mfu=round(ref["mfu"], 4),
                   reference_loss=round(ref["last_quarter_loss"], 4))
        if fast:
            out["x_reference"] = round(fast["rows_per_s"] / ref["rows_per_s"], 1)
    out["variants"] = {s["variant"]: {"rows_per_s": round(s["rows_per_s"], 2), "mfu": round(s["mfu"], 4),
                                      "loss": round(s["last_quarter_loss"], 4)} if "failed" not in s
                       else {"failed": s["failed"]} for s in summaries}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="result file (default bench/results/train_throughput/<machine>.json); every "
                                      "step of every run goes beside it (<name>.raw.json)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-throughput"), help="data, model, outputs")
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--variants", default="reference,fast")
    parser.add_argument("--recipe", action="append", default=[], help="NAME=PATH: bench another recipe as NAME")
    parser.add_argument("--try", dest="tries", action="append", default=[], help="NAME=BASE:key=value,...")
    parser.add_argument("--skip", type=float, default=0.1, help="fraction of the optimizer steps left out as warm-up")
    parser.add_argument("--timeout", type=int, default=560, help="seconds per run")
    parser.add_argument("--profile", action="store_true", help="write <variant>.profile.txt: GPU time by kernel")
    parser.add_argument("--sync-debug", action="store_true",
                        help="write <variant>.syncs.txt: where the host waited for the GPU in optimizer steps 4-5 "
                             "(torch.cuda.set_sync_debug_mode), by Python call site; those steps are left out")
    parser.add_argument("--warmup", default="fast",
                        help="run this variant once first, unmeasured, to fill Triton's kernel cache ('' for none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.worker:  # a child process: one run
        spec = json.loads(Path(opts.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return 0

    from transformers import AutoConfig

    for text in opts.recipe:
        name, _, path = text.partition("=")
        RECIPES[name] = Path(path).resolve()
    opts.work.mkdir(parents=True, exist_ok=True)
    data, model = prepare(opts.work, opts.rows)
    config = AutoConfig.from_pretrained(model)
    variants = {name: (name, {}) for name in opts.variants.split(",") if name}
    for text in opts.tries:
        name, base, changes = parse_try(text)
        variants[name] = (base, changes)

    def run_variant(name: str, base: str, changes: dict) -> tuple[Path, str | bool]:
        """One variant in its own process: (where its result is, why it failed or False)."""
        output = opts.work / "runs" / name
        bench_only = {k: v for k, v in changes.items() if k in BENCH_ONLY_KEYS}
        variant_env = {k[4:]: str(v) for k, v in changes.items() if k.startswith("env.")}
        llamafactory_changes = {k: v for k, v in changes.items() if k not in BENCH_ONLY_KEYS and not k.startswith("env.")}
        args, dropped = variant_args(base, llamafactory_changes, data=data, model=model, output=output)
        spec = {"args": args, "result": str(opts.work / f"{name}.result.json"), "bench_only": bench_only,
                "profile_to": str(opts.work / f"{name}.profile.txt") if opts.profile else None,
                "syncs_to": str(opts.work / f"{name}.syncs.txt") if opts.sync_debug else None}
        spec_path = opts.work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"[bench] {name}: {base} recipe, changed {changes or 'nothing'}; dropped {dropped}; "
              f"bench overrides {BENCH_OVERRIDES}", flush=True)
        print(f"[bench] {name} args: {json.dumps(args, sort_keys=True)}", flush=True)
        env = {"PYTORCH_CUDA_ALLOC_CONF": WORKER_ENV_DEFAULTS["PYTORCH_CUDA_ALLOC_CONF"],  # as the train stage
               **os.environ, "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", **variant_env}
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env,
                                  timeout=opts.timeout, check=False)
            failed = proc.returncode != 0 and f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {opts.timeout} s"
        if failed:
            print(f"[bench] {name}: FAILED ({failed})", flush=True)
        return Path(spec["result"]), failed

    if opts.warmup:
        # Triton compiles Liger's kernels for each new specialization (an argument divisible by
        # 16, say) the first time it appears, a second or more each, then reads them from its
        # cache on disk: a first run would count that as steady state. Any later run on the
        # machine starts warm; so does every measured run here.
        base, changes = variants.get(opts.warmup, (opts.warmup, {}))
        started = time.monotonic()
        run_variant(f"warmup-{opts.warmup}", base, changes)
        print(f"[bench] warm-up ({opts.warmup}, not measured): {time.monotonic() - started:.0f} s", flush=True)

    results, summaries = {}, []
    for name, (base, changes) in variants.items():
        started = time.monotonic()
        result_path, failed = run_variant(name, base, changes)
        if failed:
            summaries.append({"variant": name, "failed": failed})
            if not results:  # the first run failed: the harness or the wheels, not the settings
                break
            continue
        results[name] = json.loads(result_path.read_text())
        summary = summarize(name, results[name], config, opts.skip)
        summary.update(base=base, changes=changes, process_wall_s=time.monotonic() - started)
        summaries.append(summary)
        print(f"[bench] {name}: {summary['rows_per_s']:.1f} rows/s, {summary['tokens_per_s']:.0f} tokens/s, "
              f"MFU {summary['mfu']:.1%}, peak {summary['peak_allocated_gib']:.1f} GiB, "
              f"last-quarter loss {summary['last_quarter_loss']}; steady step median {summary['median_step_s']:.3f} s, "
              f"slowest {summary['slowest_step_s']:.3f} s", flush=True)
        # Written after every run, so a cut-off bench leaves the runs it finished.
        record.write("train_throughput", figures(summaries, opts.rows), opts.out,
                     raw={"summaries": summaries, "runs": results, "model_config": config.to_dict()})

    print(report_table(summaries, results, config, opts.rows), flush=True)
    return 0 if all("failed" not in s for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
