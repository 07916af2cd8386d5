"""Entry points: --help tells the truth, bad params stop with a message (not a traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.parametrize("stage", ["prepare", "baseline", "compress", "control", "quantize", "latency"])
def test_help(stage):
    out = run(f"flows.{stage}", "--help")
    assert out.returncode == 0, out.stderr
    assert "--params" in out.stdout and f"Stage `{stage}`" in out.stdout.replace("\n", " ")


def test_bad_params_exit_1_with_key_and_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: synthetic\n  synthetic:\n    train: -5\n")
    out = run("flows.prepare", "--params", str(params), cwd=tmp_path)
    assert out.returncode == 1
    assert f"{params}:4: data.synthetic.train: Input should be greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists()


def test_unreachable_target_stops_compress_before_any_work(tmp_path, tiny_spec):
    from slimloop.checkpoint import save_checkpoint
    from slimloop.model import build_model

    save_checkpoint(tmp_path / "models" / "baseline" / "best.safetensors", build_model(tiny_spec))
    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  min_channels: 8\ntarget:\n  gflops_ratio: 0.0001\n")
    out = run("flows.compress", "--params", str(params), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "target.gflops_ratio" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "models" / "compressed").exists()
