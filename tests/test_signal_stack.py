"""Native runtimes leave the thread's alternate signal stack as they found it (a freed one kills the
process with SIGSEGV at the next handled signal)."""

import subprocess
import sys

import pytest
import torch

from slimloop.deploy.sigstack import preserve_signal_stack, signal_stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack is read via libc")


def _onnx(tmp_path):
    path = tmp_path / "m.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(path), dynamo=False)
    return path


def test_openvino_runner_keeps_the_signal_stack(tmp_path):
    pytest.importorskip("openvino")
    from slimloop.deploy.runtimes import load_runner

    before = signal_stack()
    runner = load_runner("openvino", _onnx(tmp_path), threads=1)
    runner.run()
    assert signal_stack() == before
    assert runner.infer(torch.zeros(1, 3, 32, 32).numpy()).shape[1] == 8


def test_preserve_restores_a_stack_set_inside():
    import ctypes

    from slimloop.deploy import sigstack

    before = signal_stack()
    memory = ctypes.create_string_buffer(1 << 16)
    with preserve_signal_stack():
        new = sigstack._StackT(ctypes.cast(memory, ctypes.c_void_p), 0, len(memory))
        assert sigstack._libc().sigaltstack(ctypes.byref(new), None) == 0
        assert signal_stack()[0] == ctypes.addressof(memory)
    assert signal_stack() == before


def test_a_subprocess_after_openvino_under_a_sigchld_handler_survives(tmp_path):
    """The crash this guards against, end to end in a fresh interpreter: a Python SIGCHLD handler
    (torch's DataLoader installs one), OpenVINO compiled and collected, then a subprocess exits."""
    pytest.importorskip("openvino")
    code = f"""
import gc, signal, subprocess, sys
signal.signal(signal.SIGCHLD, lambda *a: None)
from slimloop.deploy.runtimes import load_runner
runner = load_runner("openvino", {str(_onnx(tmp_path))!r}, threads=1)
runner.run()
del runner
gc.collect()
for _ in range(3):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
print("alive")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-2000:])
