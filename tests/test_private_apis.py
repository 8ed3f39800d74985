"""No private name of another project is used outside workflow/patches/ (CONTRIBUTING, "A patch").

Each ``workflow/**/*.py`` outside ``workflow/patches/`` is read with ``ast``; a use of another
project's internals is any of:

- an import of a module with a private segment (``ray._raylet``, ``ray.serve._private.x``,
  ``ray.llm._internal...``), or of a name starting with ``_`` from another project;
- ``X._name`` where ``X`` is bound to another project's module, class or object: an import, or
  a name assigned from one (``client = ray_thing(...)``; one level of assignment, module-wide);
- in a class with a base from another project (or from workflow/patches/, whose classes carry
  their bases' attributes along): ``super()._name``, or ``self._name`` that the class neither
  assigns nor defines itself (an attribute the base class keeps privately);
- ``getattr``/``setattr``/``hasattr``/``delattr`` of such an ``X`` with a literal ``"_name"``;
- a string constant that is a dotted path into another project with a private segment (an
  import path handed to the library, ``"ray.serve._private.x:f"``);
- a public-looking name listed in ``INTERNAL_IN_PRACTICE``.

"Another project" is any top-level module that is neither the standard library nor ``workflow``.
Dunder names (``__init__``, ``__version__``) are not private. What a patch module does is its own
business: it declares the versions it was tested on and refuses outside them
(tests/patches/test_gates.py).
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow"
PATCHES = PACKAGE / "patches"

# Public-looking names that are internal in practice: undocumented helpers of another project,
# not part of what it promises to keep.
INTERNAL_IN_PRACTICE = {
    # vLLM's engine-argument defaults by device and usage context: an undocumented classmethod that
    # EngineArgs calls on itself (vllm/engine/arg_utils.py); its result is a tuple of dicts keyed
    # by UsageContext, a shape no user of vLLM is meant to depend on.
    "vllm.engine.arg_utils.EngineArgs.get_batch_defaults",
}

# A dotted import path into another project (``pkg.mod.attr`` or ``pkg.mod:attr``), as a whole string.
DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+(:[A-Za-z_][\w.]*)?")


@dataclass(frozen=True)
class Use:
    path: str
    line: int
    name: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}"


def private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and segment.endswith("__"))


def foreign(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top != "workflow" and top not in sys.stdlib_module_names


def _root(node: ast.AST) -> ast.AST:
    """The innermost value of an attribute/call/subscript chain (``a`` in ``a.b().c[0].d``)."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a plain attribute chain of names, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def foreign_bindings(tree: ast.AST) -> dict[str, str]:
    """Name -> the other project's module or object it is bound to, anywhere in the module."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if foreign(alias.name):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and foreign(node.module or ""):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    # One level of assignment from such a name (an instance, a client, a submodule).
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in bound:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name) and target.id not in bound:
                        bound[target.id] = _described(node.value, bound)
    return bound


def patch_bindings(tree: ast.AST) -> set[str]:
    """Names bound to workflow/patches/ modules or their classes (``from ..patches import x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if (node.level and module.split(".")[0] == "patches") or module.startswith("workflow.patches") or \
                    (node.level and not module and any(a.name == "patches" for a in node.names)):
                found.update(alias.asname or alias.name for alias in node.names)
    return found


def _described(node: ast.AST, bound: dict[str, str]) -> str:
    """``node`` with its root name replaced by what it is bound to: ``vllm.x.Registry._load``, ``ray.f(...)._a``."""
    if isinstance(node, ast.Name):
        return bound.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return f"{_described(node.value, bound)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_described(node.func, bound)}(...)"
    if isinstance(node, ast.Subscript):
        return f"{_described(node.value, bound)}[...]"
    return "..."


def _own_attributes(cls: ast.ClassDef) -> set[str]:
    """Names a class defines (methods, class attributes) or assigns on ``self``."""
    own = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id == "self":
            own.add(node.attr)
    for node in cls.body:
        if isinstance(node, ast.Assign):
            own.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    return own


def private_uses(source: str, path: str = "<snippet>") -> list[Use]:
    """Every use of another project's private names in ``source`` (module doc)."""
    tree = ast.parse(source, path)
    bound = foreign_bindings(tree)
    patched = patch_bindings(tree)  # a patch's class carries its base's private attributes along
    found: list[Use] = []

    def add(node: ast.AST, name: str) -> None:
        found.append(Use(path, node.lineno, name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if foreign(alias.name) and any(private(s) for s in alias.name.split(".")):
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level and foreign(node.module or ""):
            if any(private(s) for s in node.module.split(".")):
                add(node, f"from {node.module} import {', '.join(a.name for a in node.names)}")
            else:
                for alias in node.names:
                    if private(alias.name) or f"{node.module}.{alias.name}" in INTERNAL_IN_PRACTICE:
                        add(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute):
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in bound:
                described = _described(node, bound)
                if private(node.attr) or described in INTERNAL_IN_PRACTICE:
                    add(node, described)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            target, name = _root(node.args[0]), node.args[1]
            if isinstance(target, ast.Name) and target.id in bound and isinstance(name, ast.Constant) and \
                    isinstance(name.value, str) and private(name.value):
                add(node, f"{node.func.id}({bound[target.id]}, {name.value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
            segments = re.split(r"[.:]", node.value)
            if foreign(segments[0]) and any(private(s) for s in segments):
                add(node, repr(node.value))
        elif isinstance(node, ast.ClassDef):
            bases = [_dotted(b) for b in node.bases]
            foreign_bases = [b for b in bases if b and b.split(".")[0] in bound.keys() | patched]
            if not foreign_bases:
                continue
            own = _own_attributes(node)
            for inner in ast.walk(node):
                if not (isinstance(inner, ast.Attribute) and private(inner.attr)):
                    continue
                value = inner.value
                via_super = (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                             and value.func.id == "super")
                via_self = isinstance(value, ast.Name) and value.id == "self" and inner.attr not in own
                if via_super or via_self:
                    add(inner, f"{'super()' if via_super else 'self'}.{inner.attr} of {', '.join(foreign_bases)}")
    return sorted(set(found), key=lambda u: (u.path, u.line, u.name))


def scanned_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if PATCHES not in p.parents]


def test_no_private_api_of_another_project_outside_patches():
    uses = [use for path in scanned_files()
            for use in private_uses(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    print("private uses outside workflow/patches/:", *(map(str, uses) if uses else ["(none)"]), sep="\n")
    assert not uses, "move these into workflow/patches/ behind a version gate, or use a public API:\n" + \
        "\n".join(map(str, uses))


def _names(source: str) -> list[str]:
    return [u.name for u in private_uses(textwrap.dedent(source))]


def test_the_scanner_finds_private_modules_and_names():
    assert _names("""
        from ray._raylet import Config
        import ray.serve._private.constants as c
        from ray.serve.context import _get_global_client
        from .local import _ours
        from os import _exit
    """) == ["from ray._raylet import Config", "import ray.serve._private.constants",
             "from ray.serve.context import _get_global_client"]


def test_the_scanner_finds_private_attributes_of_bound_names():
    assert _names("""
        import ray
        from vllm.model_executor.models import ModelRegistry
        from vllm.engine.arg_utils import EngineArgs

        def f(arch, n):
            ModelRegistry._try_load_model_cls(arch)
            EngineArgs.get_batch_defaults(n)
            client = ray.serve.context.get_client()
            client._controller.ping()
            ray.__version__
            getattr(ray, "_private")
            return "ray.serve._private.controller:run"
    """) == ["vllm.model_executor.models.ModelRegistry._try_load_model_cls",
             "vllm.engine.arg_utils.EngineArgs.get_batch_defaults",
             "ray.serve.context.get_client(...)._controller",
             "getattr(ray, '_private')",
             "'ray.serve._private.controller:run'"]


def test_the_scanner_finds_inherited_private_attributes():
    assert _names("""
        from ray.serve.llm import Ingress

        class Mine(Ingress):
            def __init__(self):
                super().__init__()
                self._own = 1

            def _set_app(self, app):
                self._own, self._paths
                super()._set_app(app)

        class Plain:
            def f(self):
                return self._anything
    """) == ["self._paths of Ingress", "super()._set_app of Ingress"]
    assert _names("""
        from ..patches import ray_serve_ingress
        from ..patches.ray_serve_llm_server import LLMServer

        class Mine(ray_serve_ingress.Ingress):
            def f(self):
                return self._model_cards

        class Server(LLMServer):
            async def g(self):
                return await super()._load()
    """) == ["self._model_cards of ray_serve_ingress.Ingress", "super()._load of LLMServer"]
