"""Reliability, bad inputs: every params.yaml mistake names its key and the entry point stops before
any work; targets no pruning can reach are refused from the spec; the fuzz tests' case counts.

The numbers these tests prove are collected in docs/reliability.md. Bad datasets and untrusted
paths are in test_reliability_data.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimloop.config import Params, load_params
from slimloop.errors import ConfigError
from slimloop.model import build_model, yolov5_spec

ROOT = Path(__file__).resolve().parents[1]



# ---- params.yaml: every mistake names its key, the entry point stops before any work ----------

# (params.yaml text, the key path the message must name, a fragment of the message)
BAD_PARAMS = [
    ("train:\n  epochs: ten\n", "train.epochs", "valid integer"),
    ("train:\n  imgsz: [256]\n", "train.imgsz", "valid integer"),
    ("data:\n  seed: 1.5\n", "data.seed", "fractional part"),
    ("data:\n  out_dir: 5\n", "data.out_dir", "valid string"),
    ("sparse:\n  lam: true\n", "sparse.lam", "expected a number, got true"),
    ("train:\n  amp: 'yes'\n", "train.amp", "expected true or false"),
    ("train:\n  ema: 1\n", "train.ema", "expected true or false"),
    ("sparse:\n  lamda: 0.001\n", "sparse.lamda", "unknown key; allowed keys: epochs, lam,"),
    ("targets:\n  gflops_ratio: 0.5\n", "targets", "unknown key; allowed keys: data"),
    ("train: 30\n", "train", "valid dictionary"),
    ("sparse:\n  lam: -0.0001\n", "sparse.lam", "greater than or equal to 0"),
    ("sparse:\n  lam: .inf\n", "sparse.lam", "finite number"),
    ("train:\n  weight_decay: .nan\n", "train.weight_decay", "finite number"),
    ("compress:\n  min_retention: 1.5\n", "compress.min_retention", "less than or equal to 1"),
    ("prune:\n  criterion: magic\n", "prune.criterion", "'gamma', 'l1' or 'random'"),
    ("prune:\n  min_channels: 0\n", "prune.min_channels", "greater than or equal to 1"),
    ("compress:\n  step_ratio: 0.2\n  min_step_ratio: 0.3\n", "compress", "must not exceed step_ratio"),
    ("pad:\n  multiple: 0\n", "pad.multiple", "1, 4, 8, 16, 32 or 'auto'"),
    ("pad:\n  multiple: 12\n", "pad.multiple", "1, 4, 8, 16, 32 or 'auto'"),
    ("train:\n  imgsz: 100\n", "train.imgsz", "multiple of the model stride 32"),
    ("compress:\n  imgsz: 200\n", "compress.imgsz", "multiple of the model stride 32"),
    ("eval:\n  imgsz_sweep: [160, 150]\n", "eval.imgsz_sweep.1", "multiple of the model stride 32"),
    ("compress:\n  step_ratio: 1\n", "compress.step_ratio", "less than 1"),
    ("compress:\n  step_ratio: true\n", "compress.step_ratio", "expected a number"),
    ("target:\n  gflops_ratio: 0\n", "target.gflops_ratio", "greater than 0"),
    ("target:\n  params_ratio: 2\n", "target.params_ratio", "less than or equal to 1"),
    ("target:\n  latency_ms: .inf\n", "target.latency_ms", "finite number"),
    ("retrain:\n  mode: prune\n", "retrain.mode", "'finetune', 'scratch' or 'rewind'"),
]


def _key_line(text: str, key: str) -> int:
    """1-based line where the last part of ``key`` (or its nearest named parent) is written."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    lines = text.split("\n")
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{parts[-1]}:"))


@pytest.fixture
def compress_entry(tmp_path, monkeypatch, capsys):
    """Run ``python -m flows.compress --params <file>`` in this process; return (exit code, stderr)."""
    import flows.compress
    from flows.common import OFFLINE_ENV, run_entry

    for key, value in OFFLINE_ENV.items():  # run_entry sets them; keep them out of later tests
        monkeypatch.setenv(key, os.environ.get(key, value))
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)

    def run(path: Path) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["flows.compress", "--params", str(path)])
        with pytest.raises(SystemExit) as info:
            run_entry(flows.compress.main)
        return info.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("text", "key", "message"), BAD_PARAMS, ids=[c[1] + ":" + c[2] for c in BAD_PARAMS])
def test_bad_params_stop_the_compress_entry_point_naming_the_key(compress_entry, tmp_path, text, key, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = compress_entry(path)
    assert code == 1
    assert err.startswith("error: invalid params:")
    assert f"{path}:{_key_line(text, key)}: {key}: " in err and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no models/, metrics/, store


def test_compress_command_with_many_mistakes_names_every_key_and_exits_1(tmp_path):
    text = "sparse:\n  lam: -1\nprune:\n  criterion: magic\npad:\n  multiple: 0\ntrain:\n  imgsz: 100\n  epoch: 3\n"
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "bad.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "flows.compress", "--params", "bad.yaml"], cwd=work,
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home),
                              "SLIMLOOP_CACHE": str(tmp_path / "store")})
    assert out.returncode == 1, out.stderr
    for line, key in [(2, "sparse.lam"), (4, "prune.criterion"), (6, "pad.multiple"), (8, "train.imgsz"),
                      (9, "train.epoch")]:
        assert f"bad.yaml:{line}: {key}: " in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sorted(p.name for p in work.iterdir()) == ["bad.yaml"] and not (tmp_path / "store").exists()


def test_numbers_written_as_yaml_strings_stay_accepted(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; refusing strings for numbers would refuse ordinary files
    path = tmp_path / "p.yaml"
    path.write_text("sparse:\n  lam: 1e-4\ntrain:\n  amp: false\n  ema: yes\n")
    params = load_params(path)
    assert params.sparse.lam == 1e-4 and params.train.amp is False and params.train.ema is True


# ---- targets that no pruning can reach: decided from the spec, before any training -------------


@pytest.mark.parametrize(("min_channels", "multiple"), [(8, 8), (5, 8), (3, 1), (20, 16)])
def test_narrowest_spec_is_what_pruning_everything_gives(min_channels, multiple):
    from slimloop.compress.feasibility import narrowest_spec
    from slimloop.compress.groups import topology
    from slimloop.compress.pad import pad_channels
    from slimloop.compress.prune import select_channels
    from slimloop.config import PadParams, PruneParams
    from slimloop.model.build import conv_widths

    spec = yolov5_spec("n", nc=2)
    topo = topology(spec)
    generator = torch.Generator().manual_seed(0)
    scores = {g: torch.rand(group.width, generator=generator) for g, group in topo.groups.items()}
    keep = pad_channels(select_channels(scores, ratio=0.999, min_channels=min_channels), scores, multiple)
    pruned = {name: int(keep[g].sum()) for name, g in topo.group_of.items()}
    narrow = narrowest_spec(spec, PruneParams(min_channels=min_channels), PadParams(multiple=multiple))
    assert conv_widths(narrow) == pruned
    assert max(pruned.values()) < max(conv_widths(spec).values())


def test_unreachable_targets_are_refused_naming_the_key():
    from slimloop.compress.feasibility import check_targets_reachable

    spec = yolov5_spec("n", nc=2)
    ok = check_targets_reachable(spec, Params.model_validate({"target": {"gflops_ratio": 0.5}}))
    assert 0.01 < ok.gflops_ratio_floor < 0.5 and 0 < ok.params_ratio_floor < 0.5
    bad = Params.model_validate({"target": {"gflops_ratio": ok.gflops_ratio_floor * 0.9,
                                            "params_ratio": ok.params_ratio_floor * 0.9}})
    with pytest.raises(ConfigError) as info:
        check_targets_reachable(spec, bad)
    message = str(info.value)
    assert "target.gflops_ratio" in message and "target.params_ratio" in message
    assert "prune.min_channels = 8" in message and "pad.multiple = 8" in message
    # a smaller floor makes the same target reachable again
    looser = bad.model_copy(update={"prune": bad.prune.model_copy(update={"min_channels": 1}),
                                    "pad": bad.pad.model_copy(update={"multiple": 1})})
    assert check_targets_reachable(spec, looser).gflops_ratio_floor < ok.gflops_ratio_floor * 0.9


def test_floor_is_a_true_lower_bound_for_real_prunes():
    from slimloop.compress.feasibility import narrowest_spec
    from slimloop.compress.groups import topology
    from slimloop.compress.pad import pad_channels
    from slimloop.compress.prune import select_channels
    from slimloop.compress.surgery import prune_model
    from slimloop.profile import gflops

    params = Params()
    spec = yolov5_spec("n", nc=2)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    topo = topology(spec)
    floor = gflops(build_model(narrowest_spec(spec, params.prune, params.pad)), 32)
    for ratio in (0.5, 0.97):  # a mild and a deep prune, each checked against the floor
        scores = {g: torch.rand(group.width) for g, group in topo.groups.items()}
        keep = pad_channels(select_channels(scores, ratio=ratio, min_channels=8), scores, 8)
        assert gflops(prune_model(model, keep, probe=32), 32) >= floor - 1e-12


# ---- fuzzing: how many generated inputs tests/test_fuzz_import.py runs -------------------------


def test_fuzz_case_counts():
    """Each fuzz test is set to run its ``max_examples``, and hypothesis really generates that many
    distinct cases: counted by wrapping each test's body and running it at a small budget."""
    from hypothesis import settings

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_fuzz_import as fuzz
    finally:
        sys.path.remove(str(ROOT / "tests"))
    tests = {name: fn for name, fn in vars(fuzz).items() if name.startswith("test_")}
    counts = {name: fn._hypothesis_internal_use_settings.max_examples for name, fn in tests.items()}
    assert counts == {"test_structured_label_lines": 300, "test_arbitrary_label_text": 500,
                      "test_arbitrary_label_bytes": 500, "test_coco_arbitrary_json": 400,
                      "test_coco_like_structures": 600}
    for name, fn in tests.items():
        seen: list[str] = []
        inner = fn.hypothesis.inner_test

        def counting(*args, _inner=inner, _seen=seen, **kwargs):
            _seen.append(repr(sorted(kwargs.items())))
            return _inner(*args, **kwargs)

        declared = fn._hypothesis_internal_use_settings
        fn.hypothesis.inner_test = counting
        fn._hypothesis_internal_use_settings = settings(declared, max_examples=25, database=None, derandomize=True)
        try:
            fn()
        finally:
            fn.hypothesis.inner_test, fn._hypothesis_internal_use_settings = inner, declared
        assert len(seen) >= 25 and len(set(seen)) >= 15, (name, len(seen), len(set(seen)))  # generated and run
