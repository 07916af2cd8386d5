"""The models the report shows, as batch-1 ONNX files under one key each (``<folder>/index.json``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slimloop.io import read_stage_json, write_json_atomic

INDEX = "index.json"


def model_key(kind: str, iteration: int | None = None, step: str | None = None, imgsz: int | None = None,
              model: str | None = None) -> str:
    """The name of a report row's model in the latency table.

    ``baseline``, ``final``, ``control``, ``iter_<k>_<step>``, ``sweep_<model>_<imgsz>``,
    ``<model>_int8``; the compress stage names its files so and the report looks them up so.
    """
    if kind == "iteration":
        return f"iter_{iteration}_{step}"
    if kind == "sweep":
        return f"sweep_{model}_{imgsz}"
    if kind == "int8":
        return f"{model}_int8"
    return kind


def export_catalogue(entries: Iterable[tuple[str, Path, int]], out_dir: Path, stage: str) -> dict[str, Any]:
    """Export each ``(key, checkpoint, imgsz)`` to ``out_dir/<key>.onnx`` (batch 1) and write the index.

    A checkpoint already exported at the same size is not exported again: its key points at the
    first file, so the latency table measures the one model once and shows one number for it.

    Args:
        entries: key, checkpoint file, square input size.
        out_dir: the folder (created; the caller owns its atomic replacement).
        stage: the stage name errors are reported under.

    Returns:
        The index: key -> ``{"file", "imgsz", "checkpoint_sha256"}`` (``file`` relative to ``out_dir``).
    """
    from slimloop.checkpoint import file_sha256, load_model
    from slimloop.deploy.export import export_onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    done: dict[tuple[str, int], str] = {}
    for key, ckpt, imgsz in entries:
        digest = file_sha256(ckpt)
        if (digest, imgsz) not in done:
            export_onnx(load_model(ckpt), out_dir / f"{key}.onnx", imgsz)
            done[(digest, imgsz)] = f"{key}.onnx"
        index[key] = {"file": done[(digest, imgsz)], "imgsz": imgsz, "checkpoint_sha256": digest}
    write_json_atomic(out_dir / INDEX, {"stage": stage, "models": index})
    return index


def read_catalogue(folder: Path, stage: str) -> dict[str, Path]:
    """key -> ONNX file of a catalogue folder; empty when the folder has no index.

    Raises:
        ConfigError: the index exists but is unreadable.
    """
    path = Path(folder) / INDEX
    if not path.exists():
        return {}
    index = read_stage_json(path, stage)
    return {key: Path(folder) / entry["file"] for key, entry in index["models"].items()}


def loop_entries(iterations: list[dict[str, Any]], baseline: Path, final: Path, imgsz: int, baseline_imgsz: int,
                 sweep_sizes: Iterable[int] = ()) -> list[tuple[str, Path, int]]:
    """The compress stage's catalogue: the baseline, every step of every iteration, the final model
    (at the loop's size) and both ends of the input-size sweep.

    Args:
        iterations: the loop's iteration dicts (``checkpoints``: step -> checkpoint file).
        baseline: the baseline checkpoint (measured at ``baseline_imgsz``, and at ``imgsz`` when that differs).
        final: the final model's checkpoint.
        imgsz: the loop's evaluation size.
        baseline_imgsz: the size ``metrics/baseline.json`` was measured at.
        sweep_sizes: ``eval.imgsz_sweep``.
    """
    entries = [("baseline", Path(baseline), baseline_imgsz)]
    if imgsz != baseline_imgsz:
        entries.append(("baseline_loop", Path(baseline), imgsz))
    for it in iterations:
        for step, ckpt in (it.get("checkpoints") or {}).items():
            entries.append((model_key("iteration", it["iteration"], step), Path(ckpt), imgsz))
    entries.append(("final", Path(final), imgsz))
    for size in sweep_sizes:
        entries += [(model_key("sweep", imgsz=size, model=m), Path(c), size)
                    for m, c in (("baseline", baseline), ("final", final))]
    return entries


def gather(folders: Iterable[tuple[Path, str]]) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """Every catalogue's models, the baseline first, and the files to use on particular runtimes.

    Args:
        folders: ``(folder, stage)`` pairs; folders without an index are skipped.

    Returns:
        ``(files, per_runtime)``: key -> ONNX file, and runtime -> key -> file (an index's ``runtimes``:
        an OpenVINO IR quantized by OpenVINO's own tool, say).
    """
    files: dict[str, Path] = {}
    per_runtime: dict[str, dict[str, Path]] = {}
    for folder, stage in folders:
        files.update(read_catalogue(folder, stage))
        path = Path(folder) / INDEX
        if path.exists():
            for runtime, named in read_stage_json(path, stage).get("runtimes", {}).items():
                per_runtime.setdefault(runtime, {}).update({k: Path(folder) / f for k, f in named.items()})
    if "baseline" in files:
        files = {"baseline": files["baseline"], **{k: v for k, v in files.items() if k != "baseline"}}
    return files, per_runtime
