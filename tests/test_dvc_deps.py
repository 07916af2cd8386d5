"""dvc.yaml's code deps are the files each stage imports, and a change to any of them reruns it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from flows.deps import code_deps, differences, stage_deps, write_deps

from slimloop.codegraph import closure, cycles, package_roots

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_code_deps_are_exactly_the_imports():
    assert differences(REPO / "dvc.yaml") == {}, "run: python -m flows.deps write"
    stages = stage_deps(REPO / "dvc.yaml")
    assert set(stages) == {"prepare", "baseline", "compress", "control", "quantize", "latency", "report"}
    assert "src/slimloop/compress/loop.py" in stages["compress"][1]
    assert "src/slimloop/compress/loop.py" not in stages["prepare"][1]


def test_no_import_cycles_in_the_library():
    assert cycles(package_roots()) == []


def _package(tmp_path: Path) -> dict[str, Path]:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    from pkg.sub import lazy\n    import os\n")
    (pkg / "b.py").write_text("from .sub.c import name\n")
    (pkg / "sub" / "c.py").write_text("name = 1\n")
    (pkg / "sub" / "lazy.py").write_text("import pkg.a\n")
    (pkg / "unused.py").write_text("")
    return {"pkg": pkg}


def test_closure_follows_lazy_relative_and_from_imports(tmp_path):
    roots = _package(tmp_path)
    assert closure(["pkg.a"], roots) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.lazy"}
    assert closure(["pkg.sub.c"], roots) == {"pkg", "pkg.sub", "pkg.sub.c"}
    assert ["pkg.a", "pkg.sub.lazy", "pkg.a"] in cycles(roots)  # the lazy import closes a circle


def test_write_rewrites_code_deps_and_keeps_data_deps(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  prepare:\n    cmd: python -m flows.prepare --quiet\n    deps:\n"
                        "      - data/raw\n      - src/slimloop/gone.py  # a stale comment\n"
                        "      - flows/prepare.py\n    params:\n      - data\n")
    assert differences(dvc_yaml, REPO)["prepare"][1] == ["src/slimloop/gone.py"]
    assert write_deps(dvc_yaml, REPO) == ["prepare"]
    assert differences(dvc_yaml, REPO) == {}
    text = dvc_yaml.read_text()
    assert "      - data/raw\n" in text and "gone.py" not in text and "    params:\n      - data\n" in text
    assert stage_deps(dvc_yaml)["prepare"][1] == code_deps("flows.prepare", REPO)


def _copy_worktree(dest: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def test_a_change_to_any_module_makes_dvc_status_report_the_stages_that_run_it(tmp_path):
    _copy_worktree(tmp_path)
    modules = sorted({d for _, deps in stage_deps(tmp_path / "dvc.yaml").values() for d in deps})
    for rel in modules:
        with open(tmp_path / rel, "a", encoding="utf-8") as fh:
            fh.write("\n# edited by the test\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    out = subprocess.run([str(dvc), "status", "--json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    changed = {stage: {path for item in items if isinstance(item, dict)
                       for path in item.get("changed deps", {})} for stage, items in json.loads(out).items()}
    for stage, (entry, _) in stage_deps(tmp_path / "dvc.yaml").items():
        assert set(code_deps(entry, REPO)) <= changed.get(stage, set()), stage
