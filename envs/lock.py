"""Write the CPU environments' locks from what .venvs/ holds, split into runtime and test packages.

For each CPU environment the installed packages (``uv pip freeze``) reachable from the test tools
(``envs/test.in``) but not from what the environment runs (its ``.in`` file and the project's own
dependencies) go to ``envs/test.lock``; every other package goes to the environment's lock. A test
package must have one version in every environment that holds it (``setup.sh`` installs
``test.lock`` into both). Run by ``envs/lock.sh`` with any interpreter that has ``packaging``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ENVS = {"train": ("envs/train.in", "envs/train.lock", ()),
        "serve": ("envs/serve-cpu.in", "envs/serve-cpu.lock", ("torchvision", "torchaudio", "torchcodec"))}
TEST_IN, TEST_LOCK = "envs/test.in", "envs/test.lock"
TEST_HEADER = "# envs/test.in's tools and what they need beyond the runtime locks (written by envs/lock.sh)\n"

# Run by an environment's interpreter: the installed distributions reachable from the requirements in argv.
CLOSURE = """
import json, sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
found, seen, stack = set(), set(), [Requirement(r) for r in sys.argv[1:]]
while stack:
    req = stack.pop()
    name, extras = canonicalize_name(req.name), tuple(sorted(req.extras))
    if name not in dists or (name, extras) in seen:
        continue
    seen.add((name, extras))
    found.add(name)
    for text in dists[name].requires or []:
        dep = Requirement(text)
        if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras or ("",)):
            stack.append(dep)
print(json.dumps(sorted(found)))
"""


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: str) -> list[str]:
    return [line.split("#")[0].strip() for line in Path(path).read_text().splitlines() if line.split("#")[0].strip()]


def reachable(python: str, roots: list[str]) -> set[str]:
    return set(json.loads(subprocess.run([python, "-c", CLOSURE, *roots], capture_output=True, text=True,
                                         check=True).stdout))


def main() -> None:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    tests = requirements(TEST_IN)
    test_pins: dict[str, tuple[str, str]] = {}
    for env, (spec, lock, excluded) in ENVS.items():
        python = f".venvs/{env}/bin/python"
        freeze = subprocess.run(["uv", "pip", "freeze", "--python", python, "--exclude-editable"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        pins = {canon(line.split("==")[0]): line for line in freeze if "==" in line}
        test_only = reachable(python, tests) - reachable(python, requirements(spec) + project)
        runtime = [line for name, line in pins.items() if name not in test_only and name not in excluded]
        Path(lock).write_text("".join(f"{line}\n" for line in runtime))
        print(f"[lock] {lock}: {len(runtime)} packages")
        for name in test_only:
            if name in test_pins and test_pins[name][1] != pins[name]:
                sys.exit(f"[lock] {name}: {test_pins[name][1]} in the {test_pins[name][0]} environment, {pins[name]} "
                         f"in the {env} environment; install one version in both")
            test_pins[name] = (env, pins[name])
    for env, (_, lock, _) in ENVS.items():  # test.lock goes into every environment: it must not move a runtime pin
        runtime = {canon(line.split("==")[0]): line.strip() for line in Path(lock).read_text().splitlines()}
        moved = [f"{runtime[n]} -> {line}" for n, (_, line) in test_pins.items() if runtime.get(n, line) != line]
        if moved:
            sys.exit(f"[lock] {TEST_LOCK} would change {lock}'s pins: {', '.join(moved)}; install one version")
    lines = sorted((line for _, line in test_pins.values()), key=lambda line: canon(line.split("==")[0]))
    Path(TEST_LOCK).write_text(TEST_HEADER + "".join(f"{line}\n" for line in lines))
    print(f"[lock] {TEST_LOCK}: {len(lines)} packages")


if __name__ == "__main__":
    main()
