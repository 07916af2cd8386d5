"""Each DVC stage's code deps, derived from its entry point's imports (python -m flows.deps check | write).

`check` prints every stage whose `deps:` in dvc.yaml list other source files than the ones its
`python -m flows.<stage>` imports (transitively, imports inside functions included) and exits 1;
`write` rewrites those lists in place. Other deps (data, checkpoints, metrics) are kept as they are.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from flows.common import run_entry
from slimloop.codegraph import closure_files, package_roots
from slimloop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CMD = re.compile(r"python -m (flows\.\w+)")
CODE_PREFIXES = ("src/", "flows/")


def roots(project: Path = ROOT) -> dict[str, Path]:
    """Where the project's two packages live: the library and the entry points."""
    return {**package_roots(), "flows": project / "flows"}


def code_deps(entry: str, project: Path = ROOT) -> list[str]:
    """Source files (relative to ``project``) that module ``entry`` runs."""
    return [p.resolve().relative_to(project.resolve()).as_posix() for p in closure_files([entry], roots(project))]


def _stage_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """``{stage: (first line, end line)}`` of each stage under ``stages:`` (two-space indent)."""
    blocks, start, name, inside = {}, None, None, False
    for i, line in enumerate(lines):
        if re.match(r"^\S", line):
            inside = line.startswith("stages:")
            if name is not None:
                blocks[name] = (start, i)
                name = None
            continue
        if inside and (m := re.match(r"^  (\w[\w-]*):\s*$", line)):
            if name is not None:
                blocks[name] = (start, i)
            name, start = m.group(1), i
    if name is not None:
        blocks[name] = (start, len(lines))
    return blocks


def _deps_span(lines: list[str], start: int, end: int) -> tuple[int, int] | None:
    """Line range of the items under ``    deps:`` inside a stage block."""
    for i in range(start, end):
        if lines[i].rstrip() == "    deps:":
            j = i + 1
            while j < end and (lines[j].startswith("      - ") or lines[j].strip().startswith("#")):
                j += 1
            return i + 1, j
    return None


def _item(line: str) -> str:
    return line.split("- ", 1)[1].split("#", 1)[0].strip()


def stage_deps(dvc_yaml: Path) -> dict[str, tuple[str | None, list[str]]]:
    """``{stage: (entry module, declared code deps)}`` read from ``dvc_yaml``."""
    lines = dvc_yaml.read_text(encoding="utf-8").splitlines()
    out = {}
    for stage, (start, end) in _stage_blocks(lines).items():
        cmd = next((CMD.search(ln) for ln in lines[start:end] if "cmd:" in ln), None)
        span = _deps_span(lines, start, end)
        items = [_item(ln) for ln in lines[span[0]:span[1]] if ln.strip().startswith("- ")] if span else []
        out[stage] = (cmd.group(1) if cmd else None, [d for d in items if d.startswith(CODE_PREFIXES)])
    return out


def differences(dvc_yaml: Path, project: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """``{stage: (missing, extra)}`` for every stage whose declared code deps are wrong."""
    out = {}
    for stage, (entry, declared) in stage_deps(dvc_yaml).items():
        if entry is None:
            continue
        wanted = code_deps(entry, project)
        missing, extra = sorted(set(wanted) - set(declared)), sorted(set(declared) - set(wanted))
        if missing or extra:
            out[stage] = (missing, extra)
    return out


def write_deps(dvc_yaml: Path, project: Path = ROOT) -> list[str]:
    """Rewrite each stage's code deps in ``dvc_yaml`` (data deps first, then the code); returns the
    stages changed.

    Raises:
        ConfigError: a stage that runs ``python -m flows.<x>`` has no ``deps:`` list.
    """
    lines = dvc_yaml.read_text(encoding="utf-8").splitlines()
    changed = []
    for stage, (start, end) in sorted(_stage_blocks(lines).items(), key=lambda kv: -kv[1][0]):
        cmd = next((CMD.search(ln) for ln in lines[start:end] if "cmd:" in ln), None)
        if cmd is None:
            continue
        span = _deps_span(lines, start, end)
        if span is None:
            raise ConfigError(f"{dvc_yaml}: stage {stage} has no deps: list")
        old = lines[span[0]:span[1]]
        kept = [ln for ln in old if ln.strip().startswith("- ") and not _item(ln).startswith(CODE_PREFIXES)]
        new = kept + [f"      - {path}" for path in code_deps(cmd.group(1), project)]
        if new != old:
            lines[span[0]:span[1]] = new
            changed.append(stage)
    dvc_yaml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "write"))
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml", help="default: the project's dvc.yaml")
    args = parser.parse_args(argv)
    if args.command == "write":
        changed = write_deps(args.dvc_yaml)
        print(f"rewrote the code deps of {', '.join(changed)}" if changed else "dvc.yaml code deps already exact")
        return 0
    diff = differences(args.dvc_yaml)
    for stage, (missing, extra) in diff.items():
        print(f"{stage}: missing {missing or '-'}; not run by the stage {extra or '-'}")
    if diff:
        print("run: python -m flows.deps write")
    return 1 if diff else 0


if __name__ == "__main__":
    run_entry(main)
