"""Reliability, no network: the tiny pipeline runs with proxies pointing nowhere and every
connection refused, in this process and as fresh entry-point interpreters.

The numbers these tests prove are collected in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from slimloop.checkpoint import load_model
from slimloop.model import build_model, yolov5_spec

ROOT = Path(__file__).resolve().parents[1]



# ---- no network: the whole tiny pipeline runs with every connection refused --------------------

NET_GUARD = '''"""Loaded by every Python process of the no-network test: log and refuse any network use."""
import os
import socket

_LOG = os.environ["SLIMLOOP_NET_LOG"]
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _refuse(what):
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(101, f"network is unreachable (no-network test): {what}")


def _remote(self, address):
    """Anything but this machine's own services (a local Prefect server): the fake proxy on port 9
    counts as remote, since reaching it means a request meant for the internet."""
    if self.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, port = address[0], address[1]
    return host not in ("127.0.0.1", "::1", "localhost") or port == 9


def connect(self, address):
    if _remote(self, address):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if _remote(self, address):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''

PIPELINE = '''
import sys
from flows import baseline, compress, prepare
from flows.common import run_entry

for stage in (prepare, baseline, compress):
    try:
        run_entry(lambda: stage.main(["--params", "params.yaml", "--quiet"]))
    except SystemExit as exc:
        if exc.code:
            raise
'''

TINY_PIPELINE_PARAMS = {
    "data": {"synthetic": {"image_size": 64, "train": 4, "val": 2, "test": 0, "max_codes": 2,
                           "min_size": 0.3, "max_size": 0.6, "distractors": 0}},
    "model": {"base": "n", "width_multiple": 0.125, "depth_multiple": 0.33, "autoanchor": False},
    "train": {"imgsz": 64, "epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu", "amp": False},
    "eval": {"latency_runs": 2, "latency_warmup": 1, "imgsz_sweep": [64]},
    "sparse": {"epochs": 1},
    "prune": {"min_channels": 2, "recalibrate": 4},
    "retrain": {"epochs": 1},
    "compress": {"iterations": 1, "step_ratio": 0.3, "min_retention": 0.0, "final_retrain": "off"},
    "target": {"gflops_ratio": None, "params_ratio": None},
}


UNREACHABLE = "http://127.0.0.1:9"
PROXY_ENV = {"HTTP_PROXY": UNREACHABLE, "HTTPS_PROXY": UNREACHABLE, "ALL_PROXY": UNREACHABLE,
             "http_proxy": UNREACHABLE, "https_proxy": UNREACHABLE, "all_proxy": UNREACHABLE,
             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def test_tiny_pipeline_runs_with_every_connection_refused(tmp_path, monkeypatch):
    """In this process: synthetic data, 1 epoch of training, evaluation, ONNX export and ONNX
    Runtime latency, with proxies pointing nowhere and socket connect/DNS refused and recorded.
    (Imports happened earlier; the entry-point test below starts a fresh interpreter.)"""
    import socket

    from conftest import NO_AUGMENT
    from slimloop.config import DataParams, EvalParams, SyntheticParams, TrainParams
    from slimloop.data.synth import generate_dataset
    from slimloop.deploy.export import export_onnx, ort_session
    from slimloop.measure import measure_model
    from slimloop.train import seed_everything, train

    attempts: list[str] = []

    def refuse(what):
        attempts.append(what)
        raise OSError(errno.ENETUNREACH, f"network is unreachable (no-network test): {what}")

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(f"connect {address}") if
                        self.family in (socket.AF_INET, socket.AF_INET6) else real_connect(self, address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(f"connect_ex {address}"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(f"getaddrinfo {host}"))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(f"create_connection {address}"))
    for key, value in PROXY_ENV.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "data"
    generate_dataset(root, DataParams(seed=1, synthetic=SyntheticParams(
        image_size=64, train=4, val=2, test=0, max_codes=2, min_size=0.3, max_size=0.6, distractors=0)),
        progress=False, workers=0)
    seed_everything(0)
    spec = yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125, depth_multiple=0.33)
    params = TrainParams(imgsz=64, epochs=1, batch_size=4, workers=0, device="cpu", amp=False, augment=NO_AUGMENT)
    eval_params = EvalParams(latency_runs=2, latency_warmup=1, imgsz_sweep=[64])
    result = train(build_model(spec), root, params, eval_params, tmp_path / "run", progress=False)
    model = load_model(result.best)
    record = measure_model(model, root, "val", 64, eval_params)
    onnx = export_onnx(model, tmp_path / "model.onnx", 64)
    outputs = ort_session(onnx).run(None, {"images": np.zeros((1, 3, 64, 64), np.float32)})
    assert attempts == []
    assert record["latency_quick_ms"] > 0 and 0 <= record["map50"] <= 1
    assert outputs[0].shape[0] == 1


@pytest.mark.slow
def test_tiny_pipeline_entry_points_need_no_network(tmp_path):
    """A fresh interpreter (imports included): ``flows.prepare`` (synthetic data),
    ``flows.baseline`` (1 epoch of training, evaluation, ONNX export and ONNX Runtime latency) and
    ``flows.compress`` (the loop as Prefect tasks, on a temporary Prefect server on loopback) with
    proxies pointing nowhere and every other socket connection refused and logged."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NET_GUARD)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(TINY_PIPELINE_PARAMS))
    log = tmp_path / "net.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{site}:{ROOT}",
           "SLIMLOOP_CACHE": str(tmp_path / "store"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "SLIMLOOP_NET_LOG": str(log), "OMP_NUM_THREADS": "2", **PROXY_ENV}
    out = subprocess.run([sys.executable, "-c", "import socket; assert socket.getaddrinfo.__module__ == "
                          "'sitecustomize', 'guard not loaded'\n" + PIPELINE],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not log.exists(), log.read_text()
    record = json.loads((work / "metrics" / "baseline.json").read_text())
    assert {"map50", "map", "gflops", "latency_quick_ms"} <= set(record)
    assert (work / "models" / "baseline" / "model.onnx").stat().st_size > 10_000
    assert (work / "data" / "prepared" / "train.json").exists()
    final = json.loads((work / "metrics" / "final.json").read_text())
    assert final["iterations_run"] == 1 and (work / "models" / "compressed" / "final.safetensors").exists()
    assert "running the steps through the step store" not in out.stderr  # Prefect itself ran, offline
