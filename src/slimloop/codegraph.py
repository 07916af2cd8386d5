"""The project's static import graph: which source files a module runs, lazy imports included."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path


def package_roots() -> dict[str, Path]:
    """``{"slimloop": <its folder>}``: the library's own package, wherever it is installed."""
    import slimloop

    return {"slimloop": Path(slimloop.__file__).resolve().parent}


def module_file(name: str, roots: Mapping[str, Path]) -> Path | None:
    """The file of module ``name`` (``pkg/mod.py`` or ``pkg/mod/__init__.py``) under ``roots``."""
    top, _, rest = name.partition(".")
    if top not in roots:
        return None
    base = roots[top].joinpath(*rest.split(".")) if rest else roots[top]
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports only a type checker runs."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not _type_checking(child):
                todo.append(child)
            else:
                todo.extend(child.orelse)


def imported_modules(name: str, roots: Mapping[str, Path]) -> set[str]:
    """Project modules that module ``name`` imports anywhere in its source (inside functions too,
    not under ``if TYPE_CHECKING:``), with the packages whose ``__init__`` each import runs."""
    path = module_file(name, roots)
    if path is None:
        return set()
    found: set[str] = set()
    for node in _runtime_nodes(_parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package(name, path).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    out: set[str] = set()
    for mod in found:
        if module_file(mod, roots) is None:
            continue  # another project's module, or a name imported from a module
        parts = mod.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    out.discard(name)
    return {m for m in out if module_file(m, roots) is not None}


def closure(names: Iterable[str], roots: Mapping[str, Path]) -> set[str]:
    """``names`` and every project module they import, transitively."""
    seen: set[str] = set()
    todo = [n for n in names if module_file(n, roots) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(imported_modules(name, roots) - seen)
    return seen


def closure_files(names: Iterable[str], roots: Mapping[str, Path]) -> list[Path]:
    """The files of :func:`closure`, sorted."""
    return sorted(module_file(n, roots) for n in closure(names, roots))  # type: ignore[type-var]


def cycles(roots: Mapping[str, Path]) -> list[list[str]]:
    """Import cycles among the modules under ``roots`` (each as a list of module names)."""
    modules = sorted(
        ".".join((top, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for top, root in roots.items() for p in root.rglob("*.py"))
    graph = {m: imported_modules(m, roots) - _parents(m) for m in modules}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in modules:
        if m not in state:
            visit(m, [])
    return found


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}
