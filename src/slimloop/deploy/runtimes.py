"""Runtimes an exported model runs on: ONNX Runtime (CPU, CUDA, TensorRT) and OpenVINO CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimloop.deploy.sigstack import preserve_signal_stack
from slimloop.errors import SlimloopError

RUNTIMES = ("onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-tensorrt")
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime CPU", "openvino": "OpenVINO CPU",
                 "onnxruntime-cuda": "ONNX Runtime CUDA", "onnxruntime-tensorrt": "ONNX Runtime TensorRT"}
ORT_PROVIDERS = {"onnxruntime": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider",
                 "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8}


class RuntimeUnavailable(SlimloopError):
    """A runtime the params name is not installed here, or has no such device."""


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), the intra-op thread count by default:
    one thread per usable CPU and one inter-op thread, so nothing is oversubscribed."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Runner:
    """One loaded model on one runtime.

    ``run()`` times one batch-1 inference on an input allocated once (and, where the runtime
    allows, outputs bound once: no allocation per call); ``infer(x)`` runs any input and returns the
    first output (for evaluation).
    """

    run: Callable[[], Any]
    infer: Callable[[np.ndarray], np.ndarray]
    runtime: str
    provider: str
    input_shape: tuple[int, ...]
    keep: list[Any] = field(default_factory=list, repr=False)  # buffers the bound run refers to


def restore_denormals() -> None:
    """Switch flush-to-zero off again on this thread. ONNX Runtime's denormal-as-zero option sets the
    CPU's FTZ/DAZ bits on the calling thread (its intra-op thread 0) and leaves them set, so torch code
    run afterwards in the same thread (the next training step) would silently flush denormals too, and
    a step's numbers would depend on whether a measurement ran before it in the process."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


def _static_shape(shape: list[Any]) -> tuple[int, ...]:
    """An input shape with every symbolic axis (a dynamic batch) set to 1."""
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)


def ort_session_options(threads: int | None, denormals_as_zero: bool = True):
    """ONNX Runtime session options: all graph optimizations, ``threads`` intra-op threads and one
    inter-op thread (sequential execution), denormals treated as zero (``session.set_denormal_as_zero``:
    subnormal values left by sparse training, or made when BN is folded into a convolution, would
    otherwise slow a model down for no reason)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = threads
    if denormals_as_zero:  # False only in benchmarks/bench_denormal.py, to show what it prevents
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.log_severity_level = 3  # errors only: optimizer notes would drown the stage's output
    return opts


def _check_provider(provider: str, runtime: str) -> None:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise RuntimeUnavailable(
            f"latency.runtime {runtime}: ONNX Runtime here has no {provider} (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine with a GPU")


def ort_runner(path: str | Path, threads: int | None, runtime: str = "onnxruntime", seed: int = 0,
               denormals_as_zero: bool = True) -> Runner:
    """A :class:`Runner` for ONNX Runtime with IOBinding: input and outputs bound once, on the device."""
    import onnxruntime as ort

    provider = ORT_PROVIDERS[runtime]
    _check_provider(provider, runtime)
    sess = ort.InferenceSession(str(path), sess_options=ort_session_options(threads, denormals_as_zero),
                                providers=[provider])
    inp = sess.get_inputs()[0]
    shape = _static_shape(inp.shape)
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)  # (1, 3, H, W)
    device = "cpu" if runtime == "onnxruntime" else "cuda"
    x_value = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    first = sess.run(None, {inp.name: x})  # output shapes for the bound buffers
    restore_denormals()
    binding = sess.io_binding()
    binding.bind_ortvalue_input(inp.name, x_value)
    keep: list[Any] = [x, x_value]
    for meta, value in zip(sess.get_outputs(), first, strict=True):
        out = ort.OrtValue.ortvalue_from_shape_and_type(value.shape, _NUMPY_TYPES[meta.type], device, 0)
        binding.bind_ortvalue_output(meta.name, out)
        keep.append(out)

    def run() -> None:
        sess.run_with_iobinding(binding)

    def infer(batch: np.ndarray) -> np.ndarray:
        out = sess.run(None, {inp.name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        restore_denormals()  # evaluation may be followed by torch code in this thread
        return out

    return Runner(run, infer, runtime, provider, shape, keep + [sess, binding])


def openvino_core():
    """An OpenVINO ``Core``; raises :class:`RuntimeUnavailable` when the package is missing."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("runtime openvino: the openvino package is not installed "
                                 "(pip install openvino)") from None
    return ov.Core()


def openvino_config(threads: int | None, fp32: bool = True) -> dict[str, Any]:
    """OpenVINO CPU settings: latency hint with one stream, ``threads`` inference threads, denormals
    flushed (``CPU_DENORMALS_OPTIMIZATION``) and, for an fp32 model, fp32 kernels (on CPUs with bf16
    or AMX OpenVINO would otherwise run it in bf16, another model than the one measured elsewhere)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "CPU_DENORMALS_OPTIMIZATION": True}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def openvino_runner(path: str | Path, threads: int | None, seed: int = 0) -> Runner:
    """A :class:`Runner` for OpenVINO CPU (an ONNX file or an IR ``.xml``); the input tensor is set
    once and outputs are shared, not copied."""
    import openvino as ov

    core = openvino_core()
    model = core.read_model(str(path))
    shape = _static_shape([d.get_length() if d.is_static else -1 for d in model.inputs[0].get_partial_shape()])
    if not model.inputs[0].get_partial_shape().is_static:
        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
    with preserve_signal_stack():
        compiled = core.compile_model(model, "CPU", openvino_config(threads))
        request = compiled.create_infer_request()
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)  # (1, 3, H, W)
    request.set_input_tensor(ov.Tensor(x, shared_memory=True))

    def run() -> None:
        request.infer(share_inputs=True, share_outputs=True)

    def infer(batch: np.ndarray) -> np.ndarray:
        other = compiled.create_infer_request()
        return np.array(other.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return Runner(run, infer, "openvino", "CPU", shape, [x, core, compiled, request])


def load_runner(runtime: str, path: str | Path, threads: int | None) -> Runner:
    """Load ``path`` on ``runtime`` (one of :data:`RUNTIMES`).

    Raises:
        RuntimeUnavailable: the runtime or its execution provider is not available here.
        SlimloopError: the file is missing.
    """
    if not Path(path).is_file():
        raise SlimloopError(f"{path}: model file not found")
    if runtime == "openvino":
        return openvino_runner(path, threads)
    if runtime in ORT_PROVIDERS:
        return ort_runner(path, threads, runtime)
    raise SlimloopError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


def runtime_versions() -> dict[str, str]:
    """Versions of the runtimes installed here (absent ones left out)."""
    import onnxruntime as ort

    out = {"onnxruntime": ort.__version__}
    try:
        import openvino as ov

        out["openvino"] = ov.__version__
    except ImportError:
        pass
    return out
