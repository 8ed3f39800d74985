"""bench/README.md's tables of current figures, rendered from bench/results/<benchmark>/<machine>.json.

    .venvs/serve/bin/python bench/table.py            # print every table
    .venvs/serve/bin/python bench/table.py --write    # rewrite the tables in bench/README.md
    .venvs/serve/bin/python bench/table.py --check    # exit 1 when bench/README.md's tables differ from the files

In the README each table sits between ``<!-- table: BENCHMARK -->`` and ``<!-- /table -->``: one row per
machine kind, the figures the section quotes, then the date (UTC) and the commit of the result file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import record

README = Path(__file__).resolve().parent / "README.md"
_BLOCK = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def num(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def by_count(mapping: dict | None, digits: int = 2, suffix: str = "") -> str:
    """``{"2": 0.946, "4": 0.901}`` -> ``2: 0.95, 4: 0.90``."""
    if not mapping:
        return "-"
    return ", ".join(f"{k}: {num(v, digits, suffix)}" for k, v in sorted(mapping.items(), key=lambda kv: int(kv[0])))


def pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def minutes(seconds) -> str:
    return "-" if seconds is None else f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def metrics(m: dict) -> str:
    names = ("function_accuracy", "slot_f1", "exact_match")
    return " / ".join(num(m.get(n), 3) for n in names) if m else "-"


Column = tuple[str, Callable[[dict], str]]
COLUMNS: dict[str, list[Column]] = {
    "train_throughput": [
        ("MFU", lambda f: pct(f.get("mfu"))), ("rows/s", lambda f: num(f.get("rows_per_s"), 1)),
        ("tokens/s", lambda f: num(f.get("tokens_per_s"), 0)), ("× reference rows/s", lambda f: num(f.get("x_reference"), 1)),
        ("loss (reference)", lambda f: f"{num(f.get('loss'), 2)} ({num(f.get('reference_loss'), 2)})"),
        ("peak GiB", lambda f: num(f.get("peak_gib"), 1))],
    "train_scaling": [
        ("rows/s by workers", lambda f: by_count(f.get("rows_per_s"), 1)),
        ("efficiency by workers", lambda f: by_count({k: v * 100 for k, v in (f.get("efficiency") or {}).items()}, 1, "%")),
        ("rows", lambda f: num(f.get("rows"), 0))],
    "batch_throughput": [
        ("steady state × plain vLLM", lambda f: num(f.get("steady_vs_vllm"))),
        ("whole job × plain vLLM", lambda f: num(f.get("job_vs_vllm"))),
        ("pairs (steady)", lambda f: ", ".join(num(x) for x in f.get("steady_vs_vllm_pairs", [])) or "-")],
    "serve_latency": [
        ("req/s × vLLM", lambda f: by_count(f.get("req_per_s_vs_vllm"))),
        ("TTFT p50 × vLLM", lambda f: by_count(f.get("ttft_p50_vs_vllm"))),
        ("TTFT p99 × vLLM", lambda f: by_count(f.get("ttft_p99_vs_vllm"))),
        ("rounds", lambda f: str(f.get("rounds", "-")))],
    "serve_soak": [
        ("requests", lambda f: num(f.get("requests"), 0)), ("failed", lambda f: str(f.get("failed_requests", "-"))),
        ("seconds", lambda f: num(f.get("seconds"), 0)), ("RSS growth", lambda f: num(f.get("rss_growth_pct"), 2, "%")),
        ("stop s", lambda f: num(f.get("stop_s"), 1))],
    "demo": [
        ("`make demo`", lambda f: minutes(f.get("seconds"))),
        ("stage seconds", lambda f: ", ".join(f"{k} {v}" for k, v in f.get("stage_seconds", {}).items()) or "-"),
        ("adapter: function acc. / slot F1 / exact", lambda f: metrics(f.get("adapter_metrics") or {})),
        ("parity", lambda f: str(f.get("parity") or "-"))],
    "cpu_train": [
        ("median step s by variant", lambda f: ", ".join(f"{k} {num(v)}" for k, v in f.get("step_s", {}).items())),
        ("speed-up", lambda f: num(f.get("speedup"), 2, "×"))],
    "cpu_lora_ops": [
        ("adapter s: vLLM's ops → the workflow's", lambda f: " → ".join(num(v, 1) for v in f.get("adapter_s", {}).values())),
        ("speed-up", lambda f: num(f.get("speedup"), 1, "×")), ("rows", lambda f: str(f.get("rows", "-")))],
    "parity_reference": [
        ("model", lambda f: f"{f.get('shape', '-')}, {f.get('dtype', '-')}"), ("rows × tokens",
         lambda f: f"{f.get('rows', '-')} × {f.get('max_tokens', '-')}"),
        ("call s", lambda f: num(f.get("call_seconds"), 1)), ("task s", lambda f: num(f.get("task_seconds"), 1)),
        ("peak GPU GiB", lambda f: num(f.get("peak_gpu_memory_gib"), 1))],
}


def faults_table(doc: dict) -> list[str]:
    lines = ["| scenario | rows lost | recovery s | failed requests | |", "| --- | --- | --- | --- | --- |"]
    for name, f in doc["figures"].items():
        other = ", ".join(f"{k} {v}" for k, v in f.items() if v is not None and k not in (
            "rows_lost", "recovery_s", "failed_requests", "exit_code"))
        lines.append(f"| {name} | {f.get('rows_lost', '-') if f.get('rows_lost') is not None else '-'} | "
                     f"{num(f.get('recovery_s'), 1)} | "
                     f"{f['failed_requests'] if f.get('failed_requests') is not None else '-'} | {other} |")
    return lines


def render(benchmark: str, docs: dict[str, dict]) -> str:
    """The table of one benchmark: a row per machine kind (the faults: a row per scenario of each machine)."""
    if benchmark == "faults":
        out = []
        for machine, doc in sorted(docs.items()):
            out += [f"{machine}, {doc['date'][:10]}, commit {doc['commit']} (each scenario's run: the file's `sources`):",
                    "", *faults_table(doc), ""]
        return "\n".join(out).rstrip("\n") + "\n"
    columns = COLUMNS.get(benchmark) or [(k, lambda f, k=k: str(f.get(k))) for k in
                                         next(iter(docs.values()))["figures"]]
    lines = ["| machine | " + " | ".join(h for h, _ in columns) + " | date | commit |",
             "| --- " * (len(columns) + 3) + "|"]
    for machine, doc in sorted(docs.items()):
        cells = [render_cell(doc["figures"], fn) for _, fn in columns]
        lines.append(f"| {machine} | " + " | ".join(cells) + f" | {doc['date'][:10]} | {doc['commit']} |")
    return "\n".join(lines) + "\n"


def render_cell(figures: dict, fn: Callable[[dict], str]) -> str:
    return fn(figures).replace("|", "/")


def update(text: str, found: dict[str, dict[str, dict]]) -> str:
    def replace(m: re.Match) -> str:
        docs = found.get(m[2])
        body = render(m[2], docs) if docs else "(no result file yet)\n"
        return m[1] + body + m[4]

    return _BLOCK.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the tables in bench/README.md")
    group.add_argument("--check", action="store_true", help="exit 1 when bench/README.md's tables are not the files'")
    args = parser.parse_args()
    found = record.read_all()
    if not (args.write or args.check):
        for benchmark, docs in found.items():
            print(f"## {benchmark}\n\n{render(benchmark, docs)}")
        return 0
    text = README.read_text()
    new = update(text, found)
    if args.check:
        missing = sorted(set(found) - set(m[2] for m in _BLOCK.finditer(text)))
        if new != text or missing:
            print(f"bench/README.md's tables differ from bench/results/ (run bench/table.py --write)"
                  f"{'; no table for ' + ', '.join(missing) if missing else ''}", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
