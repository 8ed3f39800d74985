"""The two Python environments and how a stage finds its interpreter.

LLaMA-Factory and vLLM pin conflicting versions of transformers and torch, so training runs
in the *train* environment and everything that uses vLLM or Ray Data/Serve in the *serve*
environment (see envs/README.md). ``make setup`` builds both under ``.venvs/``; the runner
starts each stage with its environment's interpreter, so nobody activates one by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import WorkflowError

TRAIN = "train"
SERVE = "serve"
REPO_ROOT = Path(__file__).resolve().parents[2]


def python_for(env: str) -> str:
    """The interpreter of ``env``: ``$WORKFLOW_<ENV>_PYTHON``, else ``.venvs/<env>`` in the repo."""
    override = os.environ.get(f"WORKFLOW_{env.upper()}_PYTHON")
    if override:
        if not Path(override).exists():
            raise WorkflowError(f"WORKFLOW_{env.upper()}_PYTHON={override}: no such interpreter")
        return override
    venv = Path(os.environ.get("WORKFLOW_VENVS", REPO_ROOT / ".venvs")) / env / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise WorkflowError(f"the {env} environment is missing ({venv})",
                        hint=f"run `make setup`, or point WORKFLOW_{env.upper()}_PYTHON at an interpreter that has it")


def command() -> str:
    """How a person types the ``workflow`` command here, for the hints the pipeline prints.

    ``make setup`` puts the CLI in ``.venvs/serve/bin``, not on PATH; ``bin/workflow`` in the
    checkout runs it from anywhere. An installed package (no checkout) has ``workflow`` on PATH.
    """
    launcher = REPO_ROOT / "bin" / "workflow"
    return os.path.relpath(launcher) if launcher.exists() else "workflow"


def stage_environment(env: str) -> dict[str, str]:
    """Environment variables for a stage process."""
    out = dict(os.environ)
    out["PYTHONUNBUFFERED"] = "1"
    # The package is installed in both environments; this also covers a plain checkout.
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), out.get("PYTHONPATH", "")) if p)
    if env == TRAIN:
        # LLaMA-Factory checks its pins at import; the train lock file already pins them.
        out.setdefault("DISABLE_VERSION_CHECK", "1")
    out.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # A caller's plotting backend module (Jupyter sets module://matplotlib_inline...) is not
    # installed in the stage's environment, and matplotlib refuses to import with it there.
    if out.get("MPLBACKEND", "").startswith("module://"):
        del out["MPLBACKEND"]
    return out

