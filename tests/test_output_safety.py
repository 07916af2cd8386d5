"""Output paths never destroy what slimloop did not write: the project, a dataset, a user's folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.test_yolo_import import make_dataset

from slimloop.config import DataParams, SyntheticParams
from slimloop.data.prepare import prepare_dataset
from slimloop.errors import OutputPathError
from slimloop.io import OUTPUT_MARKER, atomic_dir, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTH = SyntheticParams(image_size=64, train=2, val=1, test=0, max_codes=1, distractors=0)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and link (target) under ``root``, hidden ones and ``.git`` included."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link:" + os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes()
    return out


@pytest.fixture
def project(tmp_path) -> Path:
    """A temporary copy of the project's top-level files, made a git repository."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", "README.md", "pyproject.toml"):
        (root / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def run_prepare(project: Path, data: dict) -> subprocess.CompletedProcess:
    """``python -m flows.prepare`` in ``project`` with its params' data section replaced."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"] = data
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
    return subprocess.run([sys.executable, "-m", "flows.prepare", "--quiet"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("out_dir", [".", ""])
def test_out_dir_at_the_project_root_is_refused_and_the_project_survives(project, out_dir):
    before = snapshot(project)
    result = run_prepare(project, {"source": "synthetic", "out_dir": out_dir,
                                   "synthetic": TINY_SYNTH.model_dump()})
    assert result.returncode == 1
    assert "refusing" in result.stderr and "Traceback" not in result.stderr
    after = snapshot(project)
    assert {k: v for k, v in after.items() if k != "params.yaml"} == {
        k: v for k, v in before.items() if k != "params.yaml"}
    assert (project / ".git" / "HEAD").is_file()


def test_out_dir_equal_to_the_yolo_source_keeps_labels_and_yaml(tmp_path):
    data_yaml = make_dataset(tmp_path / "ds", {"a.jpg": "0 0.5 0.5 0.2 0.2\n"})
    before = snapshot(tmp_path / "ds")
    cases = {"ds": "not written by slimloop", "ds/images/train/x": "is inside the dataset source",
             "ds/labels": "not written by slimloop", "ds/labels/train/new": "is inside the dataset source",
             "ds/images": "not written by slimloop",
             ".": "is the project folder"}
    for out, reason in cases.items():
        data = DataParams(source="yolo", out_dir=out, yolo={"data_yaml": str(data_yaml)})  # relative to tmp_path
        with pytest.raises(OutputPathError, match=reason):
            prepare_dataset(data, tmp_path)
    assert snapshot(tmp_path / "ds") == before


def test_coco_out_dir_inside_its_image_folder_is_refused(tmp_path):
    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True)
    (images / "keep.jpg").write_bytes(b"x")
    write_json_atomic(tmp_path / "coco" / "train.json", {"images": [], "annotations": [], "categories": []})
    coco = {"train_json": "coco/train.json", "train_images": "coco/images",
            "val_json": "coco/train.json", "val_images": "coco/images"}
    data = DataParams(source="coco", out_dir="coco/images/prepared", coco=coco)
    with pytest.raises(OutputPathError, match="is inside the dataset source"):
        prepare_dataset(data, tmp_path)
    assert sorted(p.name for p in images.iterdir()) == ["keep.jpg"]


def test_an_unrelated_folder_file_or_link_is_never_replaced(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "thesis.tex").write_text("years of work")
    file = tmp_path / "notes.txt"
    file.write_text("notes")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("1")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(tmp_path)
    for out, reason in ((folder, "was not written by slimloop"), (file, "is not a folder"),
                        (link, "symbolic link")):
        data = DataParams(out_dir=str(out), synthetic=TINY_SYNTH)
        with pytest.raises(OutputPathError, match=reason):
            prepare_dataset(data, tmp_path / "project")
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_folder_slimloop_wrote_is_replaced_and_nothing_hidden_is_left(tmp_path):
    out = tmp_path / "prepared"
    data = DataParams(out_dir=str(out), synthetic=TINY_SYNTH)
    prepare_dataset(data, tmp_path, progress=False)
    assert (out / OUTPUT_MARKER).is_file()
    (out / "stale.txt").write_text("from an older run")
    prepare_dataset(data, tmp_path, progress=False)
    assert not (out / "stale.txt").exists() and (out / "train.json").is_file()
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert (out / "train.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_temporaries_of_a_killed_run_are_removed_on_the_next(tmp_path):
    out = tmp_path / "out"
    script = (f"import os, sys; sys.path[:0] = [{str(REPO / 'src')!r}]\n"
              "from slimloop.io import atomic_dir\n"
              f"with atomic_dir({str(out)!r}) as tmp:\n"
              "    (tmp / 'a').write_text('1'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert len(list(tmp_path.glob(".out.*"))) == 1  # what a SIGKILL leaves
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_or_file_parent_is_a_named_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"), atomic_dir(tmp_path / "afile" / "out"):
        pass
    with pytest.raises(OutputPathError, match="is a file"):
        write_json_atomic(tmp_path / "afile" / "m.json", {})
    def denied(*args, **kwargs):  # what a read-only parent does (root, as in CI, would be let in)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("slimloop.io.tempfile.mkdtemp", denied)
    monkeypatch.setattr("slimloop.io.tempfile.mkstemp", denied)
    with pytest.raises(OutputPathError, match="permission denied"), atomic_dir(tmp_path / "out"):
        pass
    with pytest.raises(OutputPathError, match="permission denied"):
        write_json_atomic(tmp_path / "m.json", {})


def test_store_prune_refuses_a_folder_that_is_not_a_store(tmp_path, monkeypatch):
    from slimloop.errors import ConfigError
    from slimloop.store.entries import open_store
    from slimloop.store.prune import StoreError, prune

    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "work" / "report.docx").write_text("important")
    (home / ".bashrc").write_text("x")
    os.utime(home / "work", (0, 0))
    monkeypatch.setenv("SLIMLOOP_CACHE", str(home))
    with pytest.raises(StoreError, match="not a slimloop step store"):
        prune(home, [tmp_path], keep_days=0, dry_run=False)
    with pytest.raises(ConfigError, match="not a slimloop step store"):
        open_store()
    assert (home / "work" / "report.docx").read_text() == "important"
    fresh = open_store(tmp_path / "store")
    (fresh / "work").mkdir()
    os.utime(fresh / "work", (0, 0))
    assert prune(fresh, [tmp_path], keep_days=0, dry_run=False) == 0
    assert not (fresh / "work").exists()
