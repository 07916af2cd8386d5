"""Padded against unpadded, side by side: the latency of each iteration's pruned model (widths as
the global threshold left them) and its padded twin (every width rounded up to pad.multiple);
and the final model against the baseline, the same way.

Both come from the step store of the last `dvc repro` ($SLIMLOOP_CACHE), matched to the records
in metrics/iterations/iter_*.json. They are measured in one process, alternating, several rounds, so that machine
noise hits both alike; the ratio is what to read.

    python benchmarks/bench_pad.py [--rounds 5] [--runs 100]

Writes benchmarks/results/pad.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from slimloop.checkpoint import load_model
from slimloop.deploy.export import export_onnx
from slimloop.io import write_json_atomic
from slimloop.model.build import conv_modules
from slimloop.profile import gflops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pad.json"


def _ort_session(model, imgsz: int, path: Path, threads: int):
    import onnxruntime as ort

    export_onnx(model, path, imgsz)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(session, x: np.ndarray, runs: int) -> float:
    import time

    name = session.get_inputs()[0].name
    for _ in range(10):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _side_by_side(models: dict, args, x: np.ndarray, work: Path, tag: str) -> dict:
    """GFLOPs, median latency over ``args.rounds`` alternating rounds, and whether every width is a
    multiple of 8, for each named model."""
    sessions = {n: _ort_session(m, args.imgsz, work / f"{n}_{tag}.onnx", args.threads) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.rounds):  # alternate, so drifting machine load hits both
        for n, sess in sessions.items():
            times[n].append(_median_ms(sess, x, args.runs))
    row = {}
    for n, m in models.items():
        row[f"{n}_gflops"] = round(gflops(m, args.imgsz), 6)
        row[f"{n}_latency_ms"] = round(statistics.median(times[n]), 4)
        row[f"{n}_widths_multiple_of_8"] = all(c.conv.out_channels % 8 == 0 for c in conv_modules(m).values())
    return row


def _manifests() -> list[dict]:
    from slimloop.store.entries import store_dir

    out = []
    for path in store_dir().glob("*/step.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _find(manifests: list[dict], name: str, record: dict) -> Path | None:
    """The store checkpoint of step ``name`` whose record is ``record`` (same params, GFLOPs, mAP)."""
    keys = ("params", "gflops", "map", "map50")
    for m in manifests:
        if m.get("name") == name and all(m["record"].get(k) == record.get(k) for k in keys):
            if Path(m["checkpoint"]).exists():
                return Path(m["checkpoint"])
    return None


def checkpoints(metrics: Path) -> list[tuple[int, Path, Path]]:
    """(iteration, pruned checkpoint, padded checkpoint): each iteration's records matched to the
    step store's entries (the store of this machine's last `dvc repro`)."""
    manifests, out = _manifests(), []
    for path in sorted(metrics.glob("iter_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        it = json.loads(path.read_text())
        pruned = _find(manifests, "prune", it["steps"]["pruned"])
        padded = _find(manifests, "pad", it["steps"]["padded"])
        if pruned and padded:
            out.append((it["iteration"], pruned, padded))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics" / "iterations")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    pairs = checkpoints(args.metrics)
    if not pairs:
        raise SystemExit(f"no pruned/padded checkpoints found through {args.metrics}: run `dvc repro compress` first")
    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    rows = []
    work = ROOT / "benchmarks" / "results" / ".pad_onnx"
    work.mkdir(parents=True, exist_ok=True)
    for k, pruned, padded in pairs:
        row = {"iteration": k, **_side_by_side({"pruned": load_model(pruned), "padded": load_model(padded)},
                                               args, x, work, str(k))}
        row["padded_over_pruned_latency"] = round(row["padded_latency_ms"] / row["pruned_latency_ms"], 4)
        rows.append(row)
        print(row)
    final = None
    baseline_ckpt = ROOT / "models" / "baseline" / "best.safetensors"
    final_ckpt = ROOT / "models" / "compressed" / "final.safetensors"
    if baseline_ckpt.exists() and final_ckpt.exists():
        models = {"baseline": load_model(baseline_ckpt), "final": load_model(final_ckpt)}
        final = _side_by_side(models, args, x, work, "final")
        final["baseline_over_final_latency"] = round(final["baseline_latency_ms"] / final["final_latency_ms"], 4)
        print(final)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    write_json_atomic(RESULTS, {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                                "imgsz": args.imgsz, "rounds": args.rounds, "runs": args.runs, "rows": rows,
                                "final_vs_baseline": final})


if __name__ == "__main__":
    main()
