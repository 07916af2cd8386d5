"""The committed dvc.lock hashes what git tracks: no bytecode or cache files among its code deps.
(Whether it still describes the code is `dvc status`'s question: a code change marks its stages.)"""

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _deps() -> list[dict]:
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    return [dep for stage in lock["stages"].values() for dep in stage.get("deps", [])]


def _tracked(path: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_directory_deps_count_the_tracked_files():
    for dep in _deps():
        if "nfiles" in dep and _tracked(dep["path"]):  # a folder of code or config in git
            assert dep["nfiles"] == len(_tracked(dep["path"])), dep["path"]


def test_code_deps_are_tracked_files():
    code = [d for d in _deps() if d["path"].endswith((".py", ".yaml")) and "nfiles" not in d]
    assert code, "dvc.lock lists no code deps"
    for dep in code:
        assert _tracked(dep["path"]) == [dep["path"]], f"{dep['path']}: in dvc.lock, not in git"
