"""Train/serve parity: the adapter must give the same greedy tokens in the engine as it did in training.

The prompt-format guard proves the *prompt* tokens agree; this proves the *answers* do. For K
rows of the evaluated split the adapter as trained (PEFT + transformers, in the train
environment, prompts rendered by LLaMA-Factory's template: ``guard.llamafactory_prompt_ids``)
decodes greedily; those token ids are the reference. :func:`compare` sets the engine's token ids
for the same rows beside them: the share of rows that agree exactly, the mean common prefix, and
for each row that differs its first differing position with both tokens decoded. :func:`check`
fails below the recipe's threshold with one line.

The reference runs in the train environment (LLaMA-Factory's template and the PEFT version the
adapter was trained with live there; the serve environment has vLLM and no PEFT): for an engine on
the CPU as ``python -m workflow.evaluation.parity REQUEST OUT`` on this machine; for an engine on
GPUs as a Ray task with one GPU and the train environment's interpreter, which reads the model and
the adapters from storage on its own node (:func:`reference_in_ray_task`), so the driver neither copies
the model nor needs a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import envs, storage
from ..core.errors import WorkflowError
from ..core.manifest import sha256_text
from ..inference.adapters import local_adapters, model_for_engine
from ..inference.processor import model_tokenizer
from ..prompts.guard import first_difference

FILE = "parity.json"
END = "<end of output>"


# ---------------------------------------------------------------- comparison (any environment)

def compare(reference: list[list[int]], candidate: list[list[int]], decode: Callable[[int], str]) -> dict[str, Any]:
    """How far ``candidate``'s generated token ids agree with ``reference``'s, row by row.

    ``decode`` turns one token id into text, for the report of each disagreeing row.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference rows but {len(candidate)} candidate rows")
    if not reference:
        raise WorkflowError("parity: no rows to compare (a check over no rows proves nothing)",
                            hint="evaluate a split that has rows, or set evaluate.parity: null")
    prefixes, mismatches = [], []
    for row, (ref, got) in enumerate(zip(reference, candidate)):
        at = first_difference(list(ref), list(got))
        prefixes.append(min(len(ref), len(got)) if at is None else at)
        if at is not None:
            mismatches.append({"row": row, "position": at,
                               "reference": decode(ref[at]) if at < len(ref) else END,
                               "engine": decode(got[at]) if at < len(got) else END,
                               "reference_tokens": len(ref), "engine_tokens": len(got)})
    n = len(reference)
    return {"rows": n, "identical": n - len(mismatches), "share_identical": (n - len(mismatches)) / n,
            "mean_common_prefix": sum(prefixes) / n, "mismatches": mismatches}


def token_decoder(model_manifest: dict[str, Any]) -> Callable[[int], str]:
    """One token id as text, by the run's model's tokenizer: :func:`compare`'s ``decode``."""
    tokenizer = model_tokenizer(model_for_engine(model_manifest["outputs"]["model"]), model_manifest["fingerprint"],
                                model_manifest.get("summary", {}).get("revision"))
    return lambda token: tokenizer.decode([token])


def describe(result: dict[str, Any]) -> str:
    """``16/16 rows identical to training`` (and the first difference, if any)."""
    text = f"{result['identical']}/{result['rows']} rows identical to training"
    if result["mismatches"]:
        m = result["mismatches"][0]
        text += (f", mean common prefix {result['mean_common_prefix']:.1f} tokens; first difference: row {m['row']} "
                 f"token {m['position']}: training {m['reference']!r}, engine {m['engine']!r}")
    return text


def check(results: dict[str, dict[str, Any]], min_identical: float, *, where: str, key: str,
          allow_mismatch: bool) -> list[str]:
    """Fail (one line) on the first adapter whose share of identical rows is below ``min_identical``.

    ``key`` is the recipe key of the settings (``evaluate.parity``); with ``allow_mismatch`` the
    failures are returned as warnings instead.
    """
    failed = []
    for name, result in results.items():
        if result["share_identical"] >= min_identical:
            continue
        message = (f"{where}: adapter {name!r} answers differently from training: {describe(result)}; "
                   f"{key}.min_identical is {min_identical}")
        if not allow_mismatch:
            raise WorkflowError(message, hint=f"see {FILE}; set {key}.allow_mismatch: true to proceed anyway")
        failed.append(message)
    return failed


def is_greedy(sampling_params: dict[str, Any]) -> bool:
    """Whether vLLM decodes greedily with these ``SamplingParams`` fields (temperature 0; vLLM's default is 1)."""
    return not sampling_params.get("temperature", 1.0)


# ---------------------------------------------------------------- the reference (runs the train env)

def reference(model: str, adapters: dict[str, str], rows: list[list[dict[str, str]]], *, template: str | None,
              max_tokens: int, dtype: str, revision: str | None = None) -> dict[str, Any]:
    """Greedy token ids of each adapter (name -> local folder) for each row's chat messages, by PEFT.

    ``template``: the LLaMA-Factory template the adapter was trained with (None: the tokenizer's chat
    template); ``dtype``: the dtype the reference model computes in (``auto``: the model's own).
    Returns ``{"dtype", "versions", "adapters": {name: [{"prompt_ids", "generated_ids"}, ...]}}``.
    """
    request = {"model": model, "revision": revision, "adapters": adapters, "rows": rows, "template": template,
               "max_tokens": max_tokens, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix="workflow-parity-") as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        python = envs.python_for(envs.TRAIN)
        proc = subprocess.run([python, "-m", "workflow.evaluation.parity", f"{tmp}/request.json", f"{tmp}/out.json"],
                              env=envs.stage_environment(envs.TRAIN), capture_output=True, text=True, check=False)
        print(proc.stdout + proc.stderr, end="", flush=True)  # to the stage's log
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
            raise WorkflowError(f"parity: the PEFT reference failed in the train environment ({python}): {last}",
                                hint="run it with --debug for the whole output")
        return json.loads((Path(tmp) / "out.json").read_text())


def reference_in_ray_task(model: str, adapters: dict[str, str], rows: list[list[dict[str, str]]], *,
                          template: str | None, max_tokens: int, dtype: str, model_key: str, adapters_key: str,
                          gpus: int = 1, revision: str | None = None) -> dict[str, Any]:
    """:func:`reference` as a Ray task with ``gpus`` GPUs, run by the train environment's interpreter.

    ``model`` and ``adapters`` are local folders, hub ids or storage URIs: the task reads them on its
    own node (a copy of a bucket's folder on that node's disk, keyed by ``model_key`` / ``adapters_key``,
    the model and train stages' fingerprints), so nothing is copied to this machine. Joins the Ray
    cluster the stage uses (``RAY_ADDRESS``) or starts the stage's private one.
    """
    import ray

    from ..inference.processor import init_ray

    init_ray()
    request = {"model": model, "revision": revision, "adapters": adapters, "rows": rows, "template": template,
               "max_tokens": max_tokens, "dtype": dtype, "model_key": model_key, "adapters_key": adapters_key}
    # max_calls=1: the worker exits after the task, so the engine that starts next gets the whole GPU back
    # (PyTorch's allocator would keep the model's memory reserved in an idle worker).
    task = ray.remote(num_gpus=gpus, max_retries=0, max_calls=1, runtime_env={
        "py_executable": envs.python_for(envs.TRAIN),
        "env_vars": {k: v for k, v in envs.stage_environment(envs.TRAIN).items()
                     if k in ("DISABLE_VERSION_CHECK", "PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME")}})(_reference_task)
    try:
        return ray.get(task.remote(request))
    except ray.exceptions.RayTaskError as err:
        last = str(err.cause if err.cause is not None else err).strip().splitlines() or ["?"]
        raise WorkflowError(f"parity: the PEFT reference failed in its Ray task: {last[-1][:300]}",
                            hint="run it with --debug for the whole output") from None


def _reference_task(request: dict[str, Any]) -> dict[str, Any]:
    """The Ray task of :func:`reference_in_ray_task`: node-local copies of what lies in a bucket, then the reference."""
    here = storage.node_local_copy  # a local folder or a hub id stays as it is
    request = {**request, "model": here(request["model"], request["model_key"]),
               "adapters": {name: here(uri, f"{request['adapters_key']}-{name}")
                            for name, uri in request["adapters"].items()}}
    return generate_reference(request)


def cache_uri(run_uri: str) -> str:
    """Where a run keeps its PEFT references (a cache: any stage may add to it, none depends on it being there)."""
    return storage.join(run_uri, "cache", "parity")


def training_template(adapters_dir: str, names: list[str], recipe) -> str | None:
    """The LLaMA-Factory template the adapters were trained with: the first one's prompt-format record, else the
    recipe's ``train.llamafactory.template``; None: the tokenizer's chat template."""
    from ..prompts.guard import FILE as RECORD

    record = storage.join(adapters_dir, names[0], RECORD)
    if storage.exists(record):
        return storage.read_json(record)["template"]
    return recipe.train.llamafactory.get("template") if recipe.train is not None else None


def reference_dtype(settings, engine_kwargs: dict[str, Any] | None) -> str:
    """The dtype the reference computes in (``ParityConfig.reference_dtype``, ``engine``: the engine's
    ``engine_kwargs.dtype``, whose ``auto`` is the model's own dtype, as for transformers)."""
    if settings.reference_dtype == "engine":
        return (engine_kwargs or {}).get("dtype", "auto")
    return settings.reference_dtype


def describe_reference(found: dict[str, Any]) -> dict[str, Any]:
    """How a reference was computed, for parity.json and smoke.json."""
    return {"by": "PEFT + transformers (train environment), greedy", "dtype": found["dtype"],
            "device": found["device"], "template": found["template"], "versions": found["versions"],
            **{k: found[k] for k in ("seconds", "peak_gpu_memory_bytes") if k in found}}


def stored_reference(*, model_manifest: dict[str, Any], train_manifest: dict[str, Any], adapters: dict[str, str],
                     rows: list[list[dict[str, str]]], template: str | None, dtype: str, max_tokens: int,
                     cache_uri: str, scratch: Path, gpus: int | None = None) -> dict[str, Any]:
    """:func:`reference` for a run's adapters (name -> URI), each computed once per run: on this machine, or
    with ``gpus`` (an engine on GPUs: 1) as a Ray task with that many GPUs (:func:`reference_in_ray_task`).

    Each adapter's reference is kept under ``cache_uri`` keyed by the model and train stages'
    fingerprints, the adapter's name, the rows, the template, the dtype and ``max_tokens``: the
    serve stage reuses what evaluate computed, and computes only what it lacks (no evaluate stage,
    other settings). On the CPU path a model or adapter in a bucket is copied to ``scratch`` first.
    """
    def key(name: str) -> str:
        return sha256_text(json.dumps({"model": model_manifest["fingerprint"], "train": train_manifest["fingerprint"],
                                       "adapter": name, "rows": rows, "template": template, "dtype": dtype,
                                       "max_tokens": max_tokens}, sort_keys=True))[:32]

    uris = {name: storage.join(cache_uri, f"reference-{key(name)}.json") for name in adapters}
    found = {name: storage.read_json(uri) for name, uri in uris.items() if storage.exists(uri)}
    missing = {name: uri for name, uri in adapters.items() if name not in found}
    if missing:
        source = model_for_engine(model_manifest["outputs"]["model"])
        revision = model_manifest.get("summary", {}).get("revision")
        if gpus is not None:
            computed = reference_in_ray_task(source, missing, rows, template=template, max_tokens=max_tokens,
                                             dtype=dtype, revision=revision, model_key=model_manifest["fingerprint"],
                                             adapters_key=train_manifest["fingerprint"], gpus=gpus)
        else:
            if "://" in source:
                source = str(storage.materialize(source, scratch / "model"))
            computed = reference(source, local_adapters(missing, scratch / "adapters"), rows, template=template,
                                 max_tokens=max_tokens, dtype=dtype, revision=revision)
        for name in missing:
            found[name] = {**{k: v for k, v in computed.items() if k != "adapters"}, "template": template,
                           "rows": computed["adapters"][name]}
            storage.write_json(uris[name], found[name])
    return found


def generate_reference(request: dict[str, Any]) -> dict[str, Any]:
    """The train-environment side of :func:`reference`."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..prompts.guard import chat_template_prompt_ids, llamafactory_prompt_ids

    started = time.monotonic()
    torch.manual_seed(0)
    revision = request.get("revision")
    tokenizer = AutoTokenizer.from_pretrained(request["model"], revision=revision)
    dtype = request["dtype"] if request["dtype"] == "auto" else getattr(torch, request["dtype"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # On a GPU, loaded straight onto it (not first into host memory as a whole).
    base = AutoModelForCausalLM.from_pretrained(request["model"], revision=revision, dtype=dtype,
                                                **({"device_map": device} if device == "cuda" else {})).to(device)
    # What vLLM stops on: the tokenizer's end-of-sequence token and the generation config's.
    eos = base.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    prompts = [llamafactory_prompt_ids(tokenizer, request["template"], messages) if request["template"]
               else chat_template_prompt_ids(tokenizer, messages) for messages in request["rows"]]
    model = None
    out: dict[str, list[dict[str, list[int]]]] = {}
    for name, folder in request["adapters"].items():
        if model is None:
            model = peft.PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        model.set_adapter(name)
        model.eval()
        out[name] = []
        for ids in prompts:
            with torch.no_grad():
                generated = model.generate(input_ids=torch.tensor([ids], device=device),
                                           attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                           do_sample=False, max_new_tokens=request["max_tokens"],
                                           eos_token_id=sorted(eos) or None,
                                           pad_token_id=tokenizer.pad_token_id or next(iter(eos), 0))
            out[name].append({"prompt_ids": ids, "generated_ids": generated[0, len(ids):].tolist()})
    found = {"dtype": str(base.dtype).removeprefix("torch."), "device": device,
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__},
             "seconds": round(time.monotonic() - started, 1), "adapters": out}
    if device == "cuda":
        found["device"] = f"cuda ({torch.cuda.get_device_name()})"
        found["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m workflow.evaluation.parity REQUEST.json OUT.json`` (train env)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m workflow.evaluation.parity REQUEST.json OUT.json", file=sys.stderr)
        return 2
    result = generate_reference(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
