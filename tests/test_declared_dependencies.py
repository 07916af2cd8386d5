"""Every declared dependency is used: runtime ones are imported by src/ or flows/, dev ones by
tests/ or run as a tool (the Makefile, pytest's addopts)."""

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _imports(*folders: str) -> set[str]:
    found = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    return found


def _top_level(dist: str) -> set[str]:
    """The import names a distribution provides (from its RECORD: top-level packages and modules)."""
    files = metadata.distribution(dist).files or []
    names = set()
    for f in files:
        top = f.parts[0]
        if top.endswith((".dist-info", ".data")) or top == "..":
            continue
        names.add(top.removesuffix(".py").split(".")[0])
    return names


def test_every_runtime_dependency_is_imported():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    used = _imports("src", "flows")
    commands = (REPO / "Makefile").read_text() + (REPO / "deploy.yaml").read_text()
    tool_use = {"dvc": "dvc"}  # the pipeline's own runner: `dvc repro` in the Makefile and the nightly run
    unused = [d for d in map(_name, project["dependencies"])
              if not (_top_level(d) & used or tool_use.get(d, "\0") in commands)]
    assert unused == [], f"declared but never imported by src/ or flows/: {unused}"


def test_every_dev_dependency_is_used_by_the_tests_or_a_tool():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev = [_name(d) for d in project["project"]["optional-dependencies"]["dev"]]
    used = _imports("tests")
    tools = (REPO / "Makefile").read_text() + project["tool"]["pytest"]["ini_options"]["addopts"]
    tool_use = {"pytest-timeout": "--timeout", "pytest-xdist": "-n auto", "ruff": "ruff check",
                "uv": "uv pip compile"}
    unused = [d for d in dev if not (_top_level(d) & used or tool_use.get(d, "\0") in tools)]
    assert unused == [], f"dev dependencies nothing uses: {unused}"
