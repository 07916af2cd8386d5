"""Cost of a model: parameters, fp16 file size, FLOPs and a quick single batch-1 latency reading."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from slimloop.config import EvalParams
from slimloop.deploy.export import eval_copy, export_onnx


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def size_mb(model: torch.nn.Module) -> float:
    """Size in MB (1e6 bytes) of the state dict saved as an fp16 safetensors file.

    Floating tensors are stored as fp16, integer buffers keep their dtype; the file is
    written to a temporary folder, measured and deleted.
    """
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(state, str(path))
        return path.stat().st_size / 1e6


def gflops(model: torch.nn.Module, imgsz: int) -> float:
    """GFLOPs (2 x multiply-accumulates) of one eval forward at batch 1, ``imgsz`` square.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
    element-wise work is not counted, as in the usual FLOPs tables).
    """
    net = eval_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)  # (1, 3, H, W)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 1e9


def _time_cuda(fn, x: torch.Tensor, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize(x.device)
        times.append(start.elapsed_time(end))
    return times


def _time_cpu(fn, x: torch.Tensor, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def latency_torch_ms(
    model: torch.nn.Module, imgsz: int, runs: int = 50, warmup: int = 10,
    threads: int | None = None, device: str | torch.device = "cpu",
) -> float:
    """Median batch-1 latency of the eager eval forward, in milliseconds.

    Args:
        model: the detector (not modified: a copy on ``device`` is timed).
        imgsz: square input size.
        runs: timed runs.
        warmup: untimed runs first.
        threads: torch CPU threads during the measurement (restored after); None keeps them.
        device: ``cpu`` or a CUDA device (timed with CUDA events).

    Returns:
        The median time of one forward pass.
    """
    device = torch.device(device)
    net = eval_copy(model, device)
    x = torch.rand(1, 3, imgsz, imgsz, device=device)  # (1, 3, H, W)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # subnormal weights left by sparse training: no slow path (x86 SSE3+)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                times = _time_cuda(net, x, runs)
            else:
                times = _time_cpu(net, x, runs)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)
    return statistics.median(times)


def latency_onnx_ms(
    onnx_path: str | Path, imgsz: int, runs: int = 50, warmup: int = 10, threads: int | None = None
) -> float:
    """Median batch-1 latency of an ONNX file on ONNX Runtime CPU, in milliseconds: one round of
    the side-by-side code (:mod:`slimloop.deploy.latency`), for one model alone.

    Args:
        onnx_path: the exported model.
        imgsz: square input size.
        runs: timed runs.
        warmup: untimed runs first.
        threads: intra-op threads (inter-op is 1); None lets ONNX Runtime choose.

    Returns:
        The median time of one run.
    """
    from slimloop.deploy.latency import time_side_by_side
    from slimloop.deploy.runtimes import ort_runner, restore_denormals

    runner = ort_runner(onnx_path, threads)
    if runner.input_shape[-2:] != (imgsz, imgsz):
        raise ValueError(f"{onnx_path} takes {runner.input_shape}, not {imgsz} px")
    try:
        return time_side_by_side({"model": runner.run}, rounds=1, runs=runs, warmup=warmup)["model"].median_ms
    finally:
        restore_denormals()


def profile(
    model: torch.nn.Module, imgsz: int, params: EvalParams, workdir: str | Path | None = None
) -> dict[str, Any]:
    """The cost columns of one model at one input size, latency as a quick single reading.

    The latencies here are one reading each, taken whenever the step ran (``*_quick_ms``): good for
    a glance and ``target.latency_ms``; the report's latencies come from the side-by-side table
    (:mod:`slimloop.deploy.latency`, ``metrics/latency.json``).

    Args:
        model: the detector (not modified).
        imgsz: square input size.
        params: ``latency_runs``, ``latency_warmup`` and ``threads``.
        workdir: folder for the temporary ONNX file (a temporary folder if None).

    Returns:
        ``params``, ``size_mb``, ``gflops``, ``imgsz``, ``latency_quick_ms`` (ONNX Runtime CPU),
        ``latency_torch_quick_ms`` (torch eager CPU), ``threads`` (the count used for both), and
        ``latency_cuda_quick_ms`` when a GPU is present.
    """
    threads = params.threads or torch.get_num_threads()
    timing = {"runs": params.latency_runs, "warmup": params.latency_warmup}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", imgsz, dynamic_batch=False)
        latency_ms = latency_onnx_ms(onnx_path, imgsz, threads=threads, **timing)
    out: dict[str, Any] = {
        "params": count_params(model),
        "size_mb": round(size_mb(model), 6),
        "gflops": round(gflops(model, imgsz), 6),
        "imgsz": imgsz,
        "latency_quick_ms": round(latency_ms, 4),
        "latency_torch_quick_ms": round(latency_torch_ms(model, imgsz, threads=threads, **timing), 4),
        "threads": threads,
    }
    if torch.cuda.is_available():
        out["latency_cuda_quick_ms"] = round(latency_torch_ms(model, imgsz, device="cuda", **timing), 4)
    return out
