"""LLaMA-Factory's arguments: the exact ``run_exp`` argument dict, and checking a recipe's keys.

- ``llamafactory_args`` builds the argument dict handed to ``run_exp`` (pure; a GPU
  benchmark calls it to reproduce the train stage's arguments without Ray).
- ``check_llamafactory_keys`` rejects keys LLaMA-Factory does not know, before any worker
  starts; ``check_recipe_in_train_env`` does it for a whole recipe from either environment
  (``workflow validate`` runs in the serve environment).

Only the standard library is imported at module level: the CLI imports this in either
environment. LLaMA-Factory is imported inside the functions that need it.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config.train import FILLED_IN
from ..core import storage
from ..core.errors import WorkflowError

# Our defaults, which a recipe's keys override: progress as one line per log, TensorBoard
# logs, and the loss curve (training_loss.png) saved with the model.
DEFAULTS: dict[str, Any] = {
    "do_train": True,
    "report_to": "tensorboard",
    "plot_loss": True,
    "disable_tqdm": True,
    "logging_steps": 10,
}

# The output_dir the stages pass: each Ray worker writes to a folder of its own local disk.
WORKER_OUTPUT = "<each worker's local disk>"


def llamafactory_args(llamafactory: dict, *, model: str, dataset_dir: str, output_dir: str,
                      dataset: str = "train", eval_dataset: str | None = None, model_revision: str | None = None) -> dict:
    """The argument dict the train stage passes to ``run_exp``.

    ``DEFAULTS``, then the recipe's LLaMA-Factory keys, then the paths from upstream stages.
    Inside a Ray worker only two things change: a remote ``model``/``dataset_dir`` is
    replaced by a copy on the worker's disk, and ``resume_from_checkpoint`` is added when
    Ray Train holds a checkpoint.
    """
    taken = sorted(set(llamafactory) & set(FILLED_IN))
    if taken:
        raise WorkflowError(f"llamafactory.{taken[0]}: filled in by the pipeline from the upstream stages; remove it")
    args = {**DEFAULTS, **llamafactory, "model_name_or_path": model, "dataset_dir": dataset_dir,
            "dataset": dataset, "output_dir": output_dir}
    if eval_dataset is not None:
        args["eval_dataset"] = eval_dataset
    if model_revision is not None:  # the commit the model stage pinned a hub model to
        args["model_revision"] = model_revision
    return args


def llamafactory_arg_names() -> set[str]:
    """Every key LLaMA-Factory's training parser accepts (train environment only)."""
    import dataclasses

    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

    classes = (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def check_llamafactory_keys(llamafactory: dict, where: str, known: set[str] | None = None) -> None:
    """Raise naming the first key LLaMA-Factory does not know (with the closest known key).

    ``known`` defaults to ``llamafactory_arg_names()``, which needs the train environment.
    """
    known = llamafactory_arg_names() if known is None else known
    for key in llamafactory:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see LLaMA-Factory's argument reference"
            raise WorkflowError(f"{where}.{key}: not a LLaMA-Factory argument", hint=hint)


def check_recipe_in_train_env(recipe) -> None:
    """Check every LLaMA-Factory section of a recipe, from either environment.

    Outside the train environment the key names come from a ``python -m
    workflow.training.llamafactory_args keys`` run there (importing LLaMA-Factory costs ~15 s of
    CPU), cached per installed llamafactory/transformers version.
    """
    sections = {"model.pretrain": recipe.model.pretrain or {}}
    if recipe.train is not None:
        sections["train.llamafactory"] = recipe.train.llamafactory
    if not any(sections.values()):
        return
    import importlib.util

    known = llamafactory_arg_names() if importlib.util.find_spec("llamafactory") else _train_env_arg_names()
    for section, keys in sections.items():
        check_llamafactory_keys(keys, f"{recipe.path or recipe.name}: {section}", known)


def _train_env_arg_names() -> set[str]:
    from ..core import envs
    from ..core.manifest import sha256_text

    python = envs.python_for(envs.TRAIN)
    venv = Path(python).parent.parent
    versions = sorted(p.name for p in venv.glob("lib/python*/site-packages/*.dist-info")
                      if p.name.startswith(("llamafactory-", "transformers-")))
    cache = storage.cache_root() / f"llamafactory-keys-{sha256_text(python + ' '.join(versions))[:16]}.json"
    if versions and cache.is_file():
        return set(json.loads(cache.read_text()))
    proc = subprocess.run([python, "-m", "workflow.training.llamafactory_args", "keys"], env=envs.stage_environment(envs.TRAIN),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WorkflowError(f"cannot list LLaMA-Factory's arguments in the train environment ({python})",
                            hint=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "run it with --debug")
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    if versions:
        storage.write_json(str(cache), names)
    return set(names)


def main(argv: list[str] | None = None) -> int:
    """``python -m workflow.training.llamafactory_args keys``: print LLaMA-Factory's argument names as JSON (train env)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["keys"]:
        print("usage: python -m workflow.training.llamafactory_args keys", file=sys.stderr)
        return 2
    print(json.dumps(sorted(llamafactory_arg_names())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
