"""Structure lint: small files, small functions, and adapt-core's import tiers.

Fails (exit 1, one line per violation: ``file:line: rule: what, the limit; fix: how``) on

* ``file-length``: a file of ``packages/*/src/**.py`` or ``tools/**.py`` over
  :data:`MAX_FILE_LINES` lines;
* ``function-length``: a function or method in those files over :data:`MAX_FUNCTION_LINES`
  lines, counted from its ``def`` line to its last line (docstring included, decorators not);
* ``import-tier``: in adapt-core (``packages/adapt-peft-core/src/adapt/core/``), an import of
  a module of the same or a higher tier than the importing module, by :data:`TIERS`. Every
  import counts: at the top of a module, inside a function, under ``if TYPE_CHECKING:``;
  relative (``from .x import``, ``from . import x``, ``from ..x import``) or absolute
  (``adapt.core.x``). Importing ``adapt.core`` itself (its ``__init__``, which re-exports
  everything) counts as the top tier. Imports inside one unit of the map (e.g. between the
  modules of ``testing/``) are free;
* ``unmapped-module``: a module or subpackage of adapt-core that :data:`TIERS` does not list;
* ``module-internals``: in ``packages/*/src``, reading or writing an object's ``__dict__`` or
  ``_modules`` (state has an owner: a model's adapter set, ``AdapterLayer.use_shared``).

Run by ``nox -s lint``; ``--root PATH`` checks another tree (the default is this repository).
Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

#: Where adapt-core lives, relative to the repository root, and its import name.
CORE_DIR = Path("packages/adapt-peft-core/src/adapt/core")
CORE = "adapt.core"

#: adapt-core's tiers: a module imports only from modules of a lower tier (0 imports nothing
#: of adapt.core), so the design has no cycles, hidden behind TYPE_CHECKING or not. Keys are module names relative to ``adapt.core``; a key
#: names a module or a whole subpackage, and the longest key that is a prefix of a module's
#: dotted name gives its tier ("testing" covers testing/toy.py). ``__init__`` is
#: ``adapt.core`` itself: it re-exports everything, so it is the top tier, alone.
TIERS: dict[str, int] = {
    # 0: import nothing from adapt.core: exceptions, type names, typing-only Protocols,
    # per-call routing and sample grouping, engine helpers, GEMM kernels, small utilities
    "__about__": 0,
    "errors": 0,
    "typenames": 0,
    "protocols": 0,
    "routing": 0,
    "distributed": 0,
    "kernels": 0,
    "progress": 0,
    "amp": 0,
    "foreign": 0,
    "signature": 0,
    "fastpath": 0,
    "deprecation": 0,
    # 1: the generic plugin store, merge math, configs, target matching, shared bases, files
    "_namespace": 1,
    "plugins": 1,
    "merge": 1,
    "config": 1,
    "targeting": 1,
    "basis": 1,
    "lowrank_linear": 1,
    "files": 1,
    "param_forward": 1,
    "param_targeting": 1,
    # 2: weight backends (and their resolution), checkpoint files, the Method object
    "backends": 2,
    "quantisers": 2,
    "checkpoint": 2,
    "method": 2,
    "layer_merging": 2,
    "layer_mixed": 2,
    "fixed_mixing": 2,
    # 3: AdapterLayer and the modules_to_save wrapper
    "layer": 3,
    "modules_to_save": 3,
    # 4: typed resolution of methods and layers; guards on the wrapped model; save collection
    "registry": 4,
    "wrapped": 4,
    "saving": 4,
    "parameter_layer": 4,
    # 5: the owner of adapter state (AdapterSet) and the walks over the model
    "adapters": 5,
    # 6: trainability (activation, bias, counts)
    "trainability": 6,
    "param_injection": 6,
    # 7: model-level jobs: injection, merging, state dicts, mixed batches
    "injection": 7,
    "merging": 7,
    "state_dict": 7,
    "batches": 7,
    # 8: folders and the Hub; other libraries' habits (the façade's base)
    "pretrained": 8,
    "combine": 8,
    "foreign_hooks": 8,
    # 9: the façade; combining saved adapters (no model)
    "model": 9,
    "combine_files": 9,
    # 10: integration, the command line, the test kit
    "trainer": 10,
    "cli": 10,
    "testing": 10,
    # 11: trainer classes of other libraries (they use trainer.find_adapted)
    "integrations": 11,
    # 12: the package itself
    "__init__": 12,
}


@dataclass(frozen=True)
class Violation:
    path: Path  # relative to the root
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path.as_posix()}:{self.line}: {self.rule}: {self.message}"


# ----------------------------------------------------------------------------- sizes


def size_files(root: Path) -> list[Path]:
    """The files the size limits apply to: ``packages/*/src/**.py`` and ``tools/**.py``."""
    found = set(root.glob("packages/*/src/**/*.py")) | set(root.glob("tools/**/*.py"))
    return sorted(p for p in found if p.is_file())


def check_sizes(root: Path, path: Path, text: str, tree: ast.Module) -> list[Violation]:
    rel = path.relative_to(root)
    found = []
    n_lines = len(text.splitlines())
    if n_lines > MAX_FILE_LINES:
        found.append(
            Violation(
                rel,
                1,
                "file-length",
                f"{n_lines} lines, the limit is {MAX_FILE_LINES}; fix: split the "
                "module into modules by concern (a package if need be)",
            )
        )
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(
                    Violation(
                        rel,
                        node.lineno,
                        "function-length",
                        f"{node.name}() is {length} lines (def to last line), "
                        f"the limit is {MAX_FUNCTION_LINES}; fix: split it into "
                        "smaller named functions",
                    )
                )
    return found


#: attributes that are another object's internals: state kept there has no owner
INTERNALS = ("__dict__", "_modules")


def check_internals(root: Path, path: Path, tree: ast.Module) -> list[Violation]:
    rel = path.relative_to(root)
    return [
        Violation(
            rel,
            node.lineno,
            "module-internals",
            f"touches .{node.attr}, the limit is none in packages/*/src; fix: keep the state "
            "in the model's adapter set (model.adapter_set.state / set_shared) or a layer's "
            "use_shared, and use public nn.Module calls (named_children, getattr, setattr)",
        )
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS
    ]


# ----------------------------------------------------------------------------- core tiers


def core_modules(core: Path) -> dict[Path, str]:
    """Every module file of adapt-core → its dotted name relative to ``adapt.core``
    (``__init__`` for the package itself, ``testing`` for testing/__init__.py)."""
    names = {}
    for path in sorted(core.rglob("*.py")):
        parts = list(path.relative_to(core).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        names[path] = ".".join(parts)
    return names


def unit_of(name: str) -> str | None:
    """The key of :data:`TIERS` that covers the module ``name`` (the longest prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in TIERS:
            return key
    return None


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted name relative to adapt.core; "__init__" for adapt.core itself
    where: str  # "at module level", "inside f()", "under TYPE_CHECKING"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import in ``node``, with where it sits (the innermost place wins)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, where
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        where = f"inside {node.name}()"
    elif isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _walk(stmt, "under TYPE_CHECKING")
        for stmt in node.orelse:
            yield from _walk(stmt, where)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, where)


def _core_relative(absolute: str) -> str | None:
    """``adapt.core.x.y`` → ``x.y``; ``adapt.core`` → ``__init__``; None outside adapt.core."""
    if absolute == CORE:
        return "__init__"
    if absolute.startswith(CORE + "."):
        return absolute[len(CORE) + 1 :]
    return None


def imports_of(name: str, is_package: bool, tree: ast.Module, known: set[str]) -> list[Import]:
    """The imports of adapt-core modules in the module ``name`` (relative to adapt.core);
    ``known`` holds the names of every core module, to tell ``from . import x`` (the module
    ``x``) from ``from . import NAME`` (a name of the package's ``__init__``)."""
    own = f"{CORE}.{name}" if name != "__init__" else CORE
    package = own if is_package else own.rpartition(".")[0]
    found = []
    for node, where in _walk(tree, "at module level"):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = []
            for alias in node.names:
                sub = _core_relative(f"{base}.{alias.name}")
                targets.append(f"{base}.{alias.name}" if sub in known else base)
        for target in dict.fromkeys(targets):  # once per module and line
            rel = _core_relative(target)
            if rel is not None:
                found.append(Import(node.lineno, rel, where))
    return found


def _tier_violation(rel: Path, name: str, imp: Import) -> Violation | None:
    unit, target_unit = unit_of(name), unit_of(imp.target)
    if unit is None or target_unit is None or unit == target_unit:
        return None
    tier, target_tier = TIERS[unit], TIERS[target_unit]
    if target_tier < tier:
        return None
    shown = "adapt.core (the package __init__)" if target_unit == "__init__" else imp.target
    how = "the same tier" if target_tier == tier else "a higher tier"
    return Violation(
        rel,
        imp.line,
        "import-tier",
        f"{unit} (tier {tier}) imports {shown} (tier {target_tier}, {how}) "
        f"{imp.where}; the limit: a module imports only from lower tiers; fix: move what it "
        "needs to a lower tier or have its caller pass it in (or correct TIERS in "
        "tools/check_structure.py)",
    )


def check_core(root: Path, parsed: dict[Path, ast.Module]) -> list[Violation]:
    core = root / CORE_DIR
    if not core.is_dir():
        return []
    modules = core_modules(core)
    known = set(modules.values())
    found = []
    for path, name in modules.items():
        rel = path.relative_to(root)
        if unit_of(name) is None:
            found.append(
                Violation(
                    rel,
                    1,
                    "unmapped-module",
                    f"{CORE}.{name} has no tier; fix: add {name.split('.')[0]!r} "
                    "to TIERS in tools/check_structure.py (a module imports "
                    "only from lower tiers)",
                )
            )
            continue
        tree = parsed.get(path)
        if tree is None:
            continue
        for imp in imports_of(name, path.name == "__init__.py", tree, known):
            violation = _tier_violation(rel, name, imp)
            if violation is not None:
                found.append(violation)
    return found


# ----------------------------------------------------------------------------- main


def parse(path: Path) -> tuple[str, ast.Module | None, str]:
    text = path.read_text(encoding="utf-8")
    try:
        return text, ast.parse(text, filename=str(path)), ""
    except SyntaxError as exc:
        return text, None, f"line {exc.lineno}: {exc.msg}"


def check(root: Path) -> list[Violation]:
    """Every violation under ``root``: sizes first, file by file, then adapt-core's tiers."""
    root = root.resolve()
    sized = set(size_files(root))
    core = {p for p in (root / CORE_DIR).rglob("*.py") if "__pycache__" not in p.parts}
    parsed: dict[Path, ast.Module] = {}
    found: list[Violation] = []
    for path in sorted(sized | core):
        text, tree, error = parse(path)
        if tree is None:
            found.append(
                Violation(
                    path.relative_to(root),
                    1,
                    "syntax-error",
                    f"cannot parse ({error}); fix: the syntax error",
                )
            )
            continue
        parsed[path] = tree
        if path in sized:
            found += check_sizes(root, path, text, tree)
        if path.relative_to(root).parts[0] == "packages":
            found += check_internals(root, path, tree)
    found += check_core(root, parsed)
    return sorted(found, key=lambda v: (v.path, v.line, v.rule))


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(
        description="Structure lint: file and function sizes, adapt-core's import tiers."
    )
    parser.add_argument(
        "--root", type=Path, default=default_root, help="repository root (default: this one)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a folder")
    violations = check(args.root)
    for violation in violations:
        print(violation)
    if violations:
        print(f"check_structure: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("check_structure: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
