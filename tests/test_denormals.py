"""Subnormal weights (left by sparse training) are flushed at export, and every runtime treats denormals as zero."""

from __future__ import annotations

import numpy as np
import torch

from slimloop.deploy.export import count_subnormals, export_onnx
from slimloop.deploy.runtimes import openvino_config, ort_runner, ort_session_options
from slimloop.model import build_model
from slimloop.model.build import conv_modules

TINY = np.finfo(np.float32).tiny  # smallest normal float32


def _with_subnormal_weights(spec):
    """A model whose every conv weight is subnormal in one channel (a pruned-to-nothing channel)."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        for conv in conv_modules(model).values():
            conv.conv.weight[0].fill_(TINY / 8)  # subnormal, not zero
            conv.bn.weight[0] = 1.0
            conv.bn.running_var[0] = 1.0 - conv.bn.eps  # BN folding keeps the weight as it is
    return model


def test_export_flushes_subnormal_constants_and_keeps_outputs(tmp_path, tiny_spec):
    model = _with_subnormal_weights(tiny_spec)
    raw = export_onnx(model, tmp_path / "raw.onnx", 64, flush_denormals=False)
    flushed = export_onnx(model, tmp_path / "flushed.onnx", 64)
    assert count_subnormals(raw) > 0  # the unflushed export really carries them
    assert count_subnormals(flushed) == 0
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    a, b = ort_runner(raw, 1).infer(x), ort_runner(flushed, 1).infer(x)
    assert np.abs(a - b).max() < 1e-4  # flushing values below 1.2e-38 changes nothing one can see


def test_runtimes_are_told_to_treat_denormals_as_zero(tmp_path, tiny_spec):
    path = export_onnx(build_model(tiny_spec), tmp_path / "m.onnx", 64)
    assert ort_session_options(1).get_session_config_entry("session.set_denormal_as_zero") == "1"
    session = ort_runner(path, 1).keep[-2]
    assert session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert openvino_config(1)["CPU_DENORMALS_OPTIMIZATION"] is True


def test_torch_timing_flushes_denormals_and_restores(tiny_spec):
    from slimloop.profile import latency_torch_ms

    assert latency_torch_ms(build_model(tiny_spec), 64, runs=1, warmup=0, threads=1) > 0
    assert torch.tensor([TINY / 8], dtype=torch.float32).item() != 0  # flush mode switched off again


def test_a_measurement_leaves_no_flush_to_zero_behind(tmp_path, tiny_spec):
    """ONNX Runtime's denormal-as-zero sets FTZ on the calling thread; the next training step must not inherit it."""
    from slimloop.config import LatencyParams
    from slimloop.deploy.latency import measure_files
    from slimloop.profile import latency_onnx_ms

    path = export_onnx(build_model(tiny_spec), tmp_path / "m.onnx", 64)
    subnormal = torch.tensor([TINY / 8], dtype=torch.float32)
    measure_files({"m": path}, "onnxruntime", LatencyParams(rounds=1, runs=1, warmup=0, threads=1))
    assert (subnormal * 1.0).item() != 0
    latency_onnx_ms(path, 64, runs=1, warmup=0, threads=1)
    assert (subnormal * 1.0).item() != 0
