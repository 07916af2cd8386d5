"""What produced a metric: package versions, Python, CPU or GPU, threads and the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# The packages whose versions decide a number slimloop writes (training, evaluation, latency, data).
PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "opencv-python-headless",
            "pycocotools", "pillow", "python-barcode", "segno", "dvc", "prefect", "slimloop")
CODE_PATHS = ("src", "flows", "pyproject.toml", "requirements")
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
              "neon", "asimd", "sve")  # the ones that change which kernels run


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model name, the SIMD flags that pick kernels, and the logical core count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": sorted(f for f in _CPU_FLAGS if f in flags)}


def gpu_info() -> dict[str, Any] | None:
    """The CUDA device torch would use (name, capability, CUDA and cuDNN versions), or None (also
    where torch is not installed, as on a board that only runs the ONNX files)."""
    try:
        import torch
    except ImportError:
        return None

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    return {"name": torch.cuda.get_device_name(index), "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def git_commit(cwd: Path | None = None) -> dict[str, Any] | None:
    """HEAD's hash and whether the code (src, flows, pyproject.toml, requirements) differs from it;
    None outside a git checkout. Metrics and dvc.lock are left out: a run rewrites them."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return {"commit": head, "dirty": bool(status)}


def environment(cwd: Path | None = None) -> dict[str, Any]:
    """Everything above in one JSON-able dict, with Python's version and torch's thread count:
    the ``env`` key of every metrics file slimloop writes."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"python": platform.python_version(), "packages": package_versions(), "cpu": cpu_info(),
            "gpu": gpu_info(), "torch_threads": threads, "git": git_commit(cwd)}


def with_env(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its ``env`` (:func:`environment`): how every metrics file says what made it."""
    return {**record, "env": environment(Path.cwd())}
