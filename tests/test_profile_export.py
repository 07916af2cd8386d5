"""Parameter count, fp16 size, FLOPs, latency and ONNX export on tiny stand-in models."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

from slimloop.config import EvalParams
from slimloop.deploy.export import check_onnx, export_onnx
from slimloop.errors import SlimloopError
from slimloop.profile import (
    count_params,
    gflops,
    latency_onnx_ms,
    latency_torch_ms,
    profile,
    size_mb,
)


class TinyDetector(nn.Module):
    """Conv-BN-SiLU stem and a 1x1 head reshaped to decoded-style (B, N, 5 + nc) output."""

    def __init__(self, nc: int = 2):
        super().__init__()
        self.no = 5 + nc
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        )
        self.head = nn.Conv2d(16, 3 * self.no, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.body(x))  # (B, 3 * no, H/4, W/4)
        b, _, h, w = y.shape
        y = y.view(b, 3, self.no, h, w).permute(0, 1, 3, 4, 2)  # (B, 3, H/4, W/4, no)
        return y.reshape(b, -1, self.no).sigmoid()  # (B, N, no)


def tiny() -> TinyDetector:
    torch.manual_seed(0)
    model = TinyDetector()
    model.body[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial BN folding in the export
    model.body[1].running_var.uniform_(0.5, 2.0)
    return model


def test_gflops_of_a_conv_is_twice_its_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    macs = 8 * 32 * 32 * (3 * 3 * 3)  # out elements x (in_chs x k x k)
    assert gflops(conv, 32) * 1e9 == 2 * macs


def test_gflops_of_tiny_detector():
    # convs: 3->8 k3 at 16x16, 8->16 k3 at 8x8, 16->21 k1 at 8x8
    macs = 8 * 16 * 16 * 27 + 16 * 8 * 8 * 72 + 21 * 8 * 8 * 16
    assert gflops(tiny(), 32) == pytest.approx(2 * macs / 1e9, rel=1e-12)


def test_count_params_and_fp16_size():
    model = tiny()
    n = 8 * 27 + 2 * 8 + 16 * 72 + 2 * 16 + 21 * 16 + 21
    assert count_params(model) == n
    mb = size_mb(model)
    # fp16 weights + BN running stats (2 bytes each) + two int64 counters, plus a small header
    payload = 2 * (n + 2 * 8 + 2 * 16) + 2 * 8
    assert payload / 1e6 < mb < (payload + 2000) / 1e6
    wider = nn.Conv2d(3, 64, 3)
    assert size_mb(wider) == pytest.approx((64 * 27 + 64) * 2 / 1e6, abs=500 / 1e6)


def test_latency_restores_threads_and_leaves_model_alone():
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    ms = latency_torch_ms(model, 32, runs=3, warmup=1, threads=1)
    assert 0 < ms < 1000
    assert torch.get_num_threads() == threads
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dynamic_batch, batch", [(False, 1), (True, 2)])
def test_export_matches_torch(tmp_path, dynamic_batch, batch):
    model = tiny()
    path = export_onnx(model, tmp_path / "m.onnx", 32, dynamic_batch=dynamic_batch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp or external data
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["output0"]
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim0.dim_param == "batch") if dynamic_batch else (dim0.dim_value == 1)
    assert check_onnx(model, path, 32, batch=batch) <= 1e-3
    assert latency_onnx_ms(path, 32, runs=3, warmup=1, threads=1) > 0


def test_check_onnx_rejects_a_different_model(tmp_path):
    path = export_onnx(tiny(), tmp_path / "m.onnx", 32)
    other = tiny()
    with torch.no_grad():
        other.head.bias += 1.0
    with pytest.raises(SlimloopError, match="differs"):
        check_onnx(other, path, 32)
    with pytest.raises(SlimloopError, match="shape"):
        check_onnx(tiny(), path, 32, batch=2)  # fixed batch 1


def test_profile_reports_every_column(tmp_path):
    model = tiny()
    params = EvalParams(latency_runs=3, latency_warmup=1, threads=1)
    out = profile(model, 32, params, workdir=tmp_path)
    expected = {"params", "size_mb", "gflops", "imgsz", "latency_quick_ms", "latency_torch_quick_ms", "threads"}
    assert expected <= set(out) and set(out) - expected <= {"latency_cuda_quick_ms"}
    assert out["params"] == count_params(model) and out["threads"] == 1 and out["imgsz"] == 32
    assert out["gflops"] == round(gflops(model, 32), 6)
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in ("latency_quick_ms", "latency_torch_quick_ms", "size_mb"))
    assert list(tmp_path.iterdir()) == []  # the temporary ONNX is gone
    assert model.training  # the original was not switched to eval


@pytest.mark.parametrize("dynamic_batch, batch", [(False, 1), (True, 2)])
def test_export_real_yolov5n(tmp_path, dynamic_batch, batch):
    from slimloop.model import build_model, yolov5_spec

    torch.manual_seed(0)
    model = build_model(yolov5_spec("n", nc=2, names=("barcode", "qrcode")))
    path = export_onnx(model, tmp_path / "n.onnx", 64, dynamic_batch=dynamic_batch)
    assert check_onnx(model, path, 64, batch=batch) <= 1e-3
