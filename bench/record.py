"""One result file per benchmark and machine kind: ``bench/results/<benchmark>/<machine>.json``.

Every bench script ends with :func:`write`, which writes

    {"benchmark", "date" (ISO 8601, UTC), "commit", "machine", "command", "figures": {...}}

where ``figures`` holds the numbers bench/README.md quotes, under keys that stay the same from one
run to the next (bench/table.py renders the README's tables from these files). A re-measured figure
replaces the old file; earlier numbers live in git. ``sources`` (optional) says, for a file whose
figures come from more than one run, which figures came from which date, commit and command.
Raw per-step data goes beside the file (``<machine>.raw.json``) only when a reader needs it, at
most :data:`RAW_LIMIT` bytes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RAW_LIMIT = 1_000_000
KEYS = ("benchmark", "date", "commit", "machine", "command", "figures")


def machine_kind() -> str:
    """``h100``, ``h100x2``, ``h200x4`` ... from the GPUs ``nvidia-smi`` lists; else ``cpu-avx512`` when the CPU
    has AVX-512 (``avx512f`` in /proc/cpuinfo), ``cpu-avx2`` otherwise."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        names = []
    names = [n.strip() for n in names if n.strip()]
    if names:
        return gpu_kind(names)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "cpu-avx512" if re.search(r"\bavx512f\b", flags) else "cpu-avx2"


def gpu_kind(names: list[str]) -> str:
    """``["NVIDIA H100 80GB HBM3"] * 2`` -> ``h100x2``: the model (H100, H200, A100, L4, ...) of the first GPU,
    lower-cased, with the count when there is more than one."""
    found = re.search(r"\b([A-Z]{1,2}\d{1,4}[A-Z]?)\b", names[0].replace("NVIDIA", ""))
    model = found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", names[0].lower()).strip("-")
    return model if len(names) == 1 else f"{model}x{len(names)}"


def commit() -> str:
    """The checked-out commit (short hash), ``+`` when the working tree has changes; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+" if dirty else "")


def command() -> str:
    """How this process was started, with the interpreter as ``python`` and paths inside the repository relative."""
    words = ["python", *sys.argv]
    return " ".join(shlex.quote(w.replace(str(REPO) + "/", "")) for w in words)


def default_path(benchmark: str, machine: str | None = None) -> Path:
    return RESULTS / benchmark / f"{machine or machine_kind()}.json"


def write(benchmark: str, figures: dict, out: str | Path | None = None, *, raw: dict | None = None,
          machine: str | None = None) -> Path:
    """Write the result file (``out`` or :func:`default_path`) complete or not at all; ``raw`` goes beside it."""
    machine = machine or machine_kind()
    path = Path(out) if out else default_path(benchmark, machine)
    doc = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": commit(), "machine": machine, "command": command(), "figures": figures}
    if raw is not None:
        text = json.dumps(raw, separators=(",", ":"), default=str) + "\n"
        if len(text.encode()) > RAW_LIMIT:
            print(f"[bench] raw data left out: {len(text.encode()):,} bytes > {RAW_LIMIT:,}", flush=True)
        else:
            _publish(path.with_name(path.stem + ".raw.json"), text)
    _publish(path, json.dumps(doc, indent=2, default=str) + "\n")
    print(f"[bench] wrote {path}", flush=True)
    return path


def _publish(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_all(results: Path = RESULTS) -> dict[str, dict[str, dict]]:
    """``{benchmark: {machine: document}}`` of every result file under ``results``."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(results.glob("*/*.json")):
        if path.name.endswith(".raw.json"):
            continue
        doc = json.loads(path.read_text())
        found.setdefault(doc["benchmark"], {})[doc["machine"]] = doc
    return found


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
