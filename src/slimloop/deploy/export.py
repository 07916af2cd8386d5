"""ONNX export of a detector's eval-mode graph, and a numerical check against torch."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from slimloop.errors import SlimloopError
from slimloop.io import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "output0"


def eval_copy(model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A deep copy of ``model`` on ``device`` in eval mode; the original is left untouched."""
    return copy.deepcopy(model).to(device).eval()


def _has_external_data(path: Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _graph_tensors(graph: onnx.GraphProto):
    """Every constant tensor of ``graph`` and its subgraphs: initializers and Constant attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)


def flush_subnormals(proto: onnx.ModelProto) -> int:
    """Set every subnormal value of the model's float constants to zero, in place.

    Sparse training drives BN gammas (and the weights they scale) toward zero; a value below the
    smallest normal float makes CPUs without flush-to-zero take a slow path on every multiply.

    Returns:
        How many values were flushed.
    """
    from onnx import numpy_helper

    flushed = 0
    for tensor in _graph_tensors(proto.graph):
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor)
        tiny = np.finfo(values.dtype).tiny  # the smallest normal number of this dtype
        subnormal = (values != 0) & (np.abs(values) < tiny)
        if subnormal.any():
            values = np.where(subnormal, np.zeros_like(values), values)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            flushed += int(subnormal.sum())
    return flushed


def count_subnormals(path: str | Path) -> int:
    """Subnormal values among the float constants of an ONNX file."""
    from onnx import numpy_helper

    count = 0
    for tensor in _graph_tensors(onnx.load(str(path)).graph):
        if tensor.data_type in _FLOAT_TYPES:
            values = numpy_helper.to_array(tensor)
            count += int(((values != 0) & (np.abs(values) < np.finfo(values.dtype).tiny)).sum())
    return count


def export_onnx(
    model: torch.nn.Module, path: str | Path, imgsz: int, dynamic_batch: bool = False, opset: int = 17,
    flush_denormals: bool = True,
) -> Path:
    """Export the eval-mode forward of ``model`` to ONNX, atomically, and validate the file.

    Uses the TorchScript-based exporter (``dynamo=False``): it still works in torch 2.14 and
    traces the decoded eval output directly. Input ``images (B, 3, imgsz, imgsz)`` float in
    [0, 1]; output ``output0``.

    Args:
        model: the detector (not modified: a CPU copy is exported).
        path: destination ``.onnx`` file.
        imgsz: square input size.
        dynamic_batch: make the batch axis dynamic; otherwise it is fixed to 1.
        opset: ONNX opset version.
        flush_denormals: set subnormal constants to zero (:func:`flush_subnormals`); False only for
            the benchmark that shows what they cost.

    Returns:
        ``path`` as a Path.

    Raises:
        SlimloopError: the exported graph fails the ONNX checker or would need external data.
    """
    path = Path(path)
    net = eval_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)  # (1, 3, H, W)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_path(path, suffix=".onnx") as tmp:
        with warnings.catch_warnings():
            # the legacy exporter announces its own deprecation on every call
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                net, (x,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamic_axes=axes, dynamo=False,
            )
        if _has_external_data(tmp):
            raise SlimloopError(f"{path}: export produced external tensor data; not supported")
        if flush_denormals:
            proto = onnx.load(str(tmp))
            if flush_subnormals(proto):
                onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise SlimloopError(f"{path}: exported ONNX graph is invalid: {exc}") from None
    return path


def ort_session(onnx_path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with the options of the latency table
    (:func:`slimloop.deploy.runtimes.ort_session_options`: denormals as zero, one inter-op thread).

    Args:
        onnx_path: the model file.
        threads: intra-op threads; None lets ONNX Runtime choose.

    Returns:
        The session.
    """
    from slimloop.deploy.runtimes import ort_session_options

    return ort.InferenceSession(str(onnx_path), sess_options=ort_session_options(threads),
                                providers=["CPUExecutionProvider"])


def check_onnx(
    model: torch.nn.Module, onnx_path: str | Path, imgsz: int, batch: int = 1, atol: float = 1e-3
) -> float:
    """Compare ONNX Runtime's output with the torch eval output on a random batch.

    Args:
        model: the detector the file was exported from (not modified).
        onnx_path: the exported file.
        imgsz: square input size.
        batch: batch size to run (2 checks a dynamic batch axis).
        atol: largest absolute difference accepted.

    Returns:
        The largest absolute difference.

    Raises:
        SlimloopError: the file cannot take the batch, the output shapes differ, or the
            difference exceeds ``atol``.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, imgsz, imgsz, generator=gen)  # (B, 3, H, W)
    with torch.inference_mode():
        expected = eval_copy(model)(x).numpy()
    session = ort_session(onnx_path)
    declared = session.get_inputs()[0].shape  # ints, or names for dynamic axes
    if any(isinstance(d, int) and d != n for d, n in zip(declared, x.shape, strict=True)):
        raise SlimloopError(f"{onnx_path}: ONNX input shape {declared} cannot take {tuple(x.shape)}")
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    from slimloop.deploy.runtimes import restore_denormals

    restore_denormals()
    if got.shape != expected.shape:
        raise SlimloopError(f"{onnx_path}: ONNX output shape {got.shape} != torch {expected.shape}")
    diff = float(np.abs(got - expected).max()) if got.size else 0.0
    if not diff <= atol:  # also catches NaN
        raise SlimloopError(f"{onnx_path}: ONNX output differs from torch by {diff:.3g} > {atol:g}")
    return diff
