"""The package's import graph, read with ``ast``: no cycles, and every import points down the layers.

    cli, __main__              the command line
    show, report_html          reading a finished run
    runner, preflight          runs the stages in order; what can fail before they start
    stages                     one module per stage, and the list of them
    dataset ... training       the libraries' glue, one package per concern
    config                     the recipe's typed sections
    core                       storage, manifests, errors, the console, the stage machinery

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a deferred
import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workflow"

# Bottom to top; a package may import its own layer's packages (without a cycle) and those below.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("config",),
    ("patches", "prompts", "dataset", "inference", "training", "evaluation", "serving"),
    ("stages",),
    ("runner", "preflight"),
    ("show", "report_html"),
    ("cli", "__main__"),
]
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = ["workflow", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "workflow")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "workflow":
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def part_of(module: str) -> str:
    """``workflow.core.stage`` -> ``core``; ``workflow.cli`` -> ``cli``; the root package -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The graph reader itself, on a package written for it: absolute, relative, deferred and
    ``from pkg import module`` imports all count, and a cycle among them is found."""
    src = tmp_path / "pkg.py"
    src.write_text("import workflow.core.storage\nfrom ..config import recipe\nfrom . import envs\n"
                   "def f():\n    from workflow.runner import run_stage\n")
    known = {"workflow.core.storage", "workflow.config.recipe", "workflow.core.envs", "workflow.runner"}
    assert imports_of("workflow.core.pkg", src, known) == known
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_part_of_the_package_has_a_layer():
    unplaced = sorted({part_of(m) for m in modules()} - set(LAYER_OF) - {""})
    assert not unplaced, f"add {unplaced} to LAYERS in tests/test_layers.py"


def test_no_module_imports_itself_back():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_imports_itself_back():
    """At the level of the sub-packages too: ``config`` -> ``evaluation`` -> ``config`` is a cycle even
    where no one module closes it."""
    parts: dict[str, set[str]] = {}
    for module, imported in graph().items():
        parts.setdefault(part_of(module), set()).update(part_of(i) for i in imported if part_of(i) != part_of(module))
    cycle = find_cycle(parts)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = []
    for module, imported in sorted(graph().items()):
        if module == "workflow":
            continue
        for target in sorted(imported):
            if target != "workflow" and LAYER_OF[part_of(target)] > LAYER_OF[part_of(module)]:
                upward.append(f"{module} ({part_of(module)}) imports {target} ({part_of(target)})")
    for level in reversed(range(len(LAYERS))):
        print(f"layer {level}: {', '.join(LAYERS[level])}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


@pytest.mark.parametrize("layer", ["core", "config"])
def test_the_bottom_layers_import_only_themselves_and_below(layer):
    """``workflow.core`` imports nothing of the package's above it; ``workflow.config`` only ``core``."""
    allowed = {part for level, parts in enumerate(LAYERS) if level <= LAYER_OF[layer] for part in parts}
    outside = {m: sorted(i for i in imported if part_of(i) not in allowed)
               for m, imported in graph().items() if part_of(m) == layer}
    outside = {m: i for m, i in outside.items() if i}
    assert not outside, f"{layer} imports from above it: {outside}"


def test_the_configs_metric_table_names_the_registered_metrics():
    """``workflow/config/task.py`` validates recipes against ``KIND_METRICS`` without importing the
    evaluation package; the metrics registered there must be exactly those, in the same order."""
    from workflow.config.task import KIND_METRICS, MAIN_METRIC
    from workflow.evaluation.metrics import METRICS

    assert {kind: list(names) for kind, names in KIND_METRICS.items()} == \
        {kind: list(registered) for kind, registered in METRICS.items()}, \
        "a metric registered in workflow/evaluation/metrics.py must be listed in workflow/config/task.py KIND_METRICS"
    assert all(MAIN_METRIC[kind] in KIND_METRICS[kind] for kind in KIND_METRICS)
