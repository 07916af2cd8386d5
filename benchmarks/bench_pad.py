"""Padded against unpadded, side by side: the latency of each iteration's pruned model (widths as
the global threshold left them) and its padded twin (every width rounded up to the iteration's multiple);
and the final model against the baseline, the same way.

Both come from the step store of the last `dvc repro` ($SLIMLOOP_CACHE), matched to the records
in metrics/iterations/iter_*.json. Every model is measured in one table by the report's own code
(slimloop.deploy.latency: loaded once, warmed up, interleaved rounds), so that machine noise hits
all alike; the ratios, with their range over the rounds, are what to read.

    python benchmarks/bench_pad.py [--rounds 7] [--runs 100] [--runtime onnxruntime]

Writes benchmarks/results/pad.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from slimloop.checkpoint import load_model
from slimloop.config import LatencyParams
from slimloop.deploy.export import export_onnx
from slimloop.deploy.latency import cpu_info, lookup, measure_files
from slimloop.deploy.runtimes import default_threads
from slimloop.io import write_json_atomic
from slimloop.model.build import conv_modules
from slimloop.profile import gflops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pad.json"


def ratio(rows: dict, slow: str, fast: str) -> dict:
    """``slow`` over ``fast`` per round (same round, same load): median and range."""
    per_round = [a / b for a, b in zip(rows[slow]["round_medians_ms"], rows[fast]["round_medians_ms"], strict=True)]
    return {"median": round(statistics.median(per_round), 4), "min": round(min(per_round), 4),
            "max": round(max(per_round), 4)}


def describe(name: str, model, imgsz: int, row: dict) -> dict:
    """GFLOPs, the side-by-side latency and whether every width is a multiple of 8."""
    return {f"{name}_gflops": round(gflops(model, imgsz), 6), f"{name}_latency_ms": row["median_ms"],
            f"{name}_iqr_ms": row["iqr_ms"],
            f"{name}_widths_multiple_of_8": all(c.conv.out_channels % 8 == 0 for c in conv_modules(model).values())}


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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args()
    pairs = checkpoints(args.metrics)
    if not pairs:
        raise SystemExit(f"no pruned/padded checkpoints found through {args.metrics}: run `dvc repro compress` first")
    models = {}
    for k, pruned, padded in pairs:
        models[f"pruned_{k}"], models[f"padded_{k}"] = load_model(pruned), load_model(padded)
    baseline_ckpt = ROOT / "models" / "baseline" / "best.safetensors"
    final_ckpt = ROOT / "models" / "compressed" / "final.safetensors"
    if baseline_ckpt.exists() and final_ckpt.exists():
        models["baseline"], models["final"] = load_model(baseline_ckpt), load_model(final_ckpt)
    params = LatencyParams(rounds=args.rounds, runs=args.runs, warmup=20, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = {n: export_onnx(m, Path(tmp) / f"{n}.onnx", args.imgsz) for n, m in models.items()}
        table = measure_files(files, args.runtime, params)  # every model in one side-by-side table
    rows, out = lookup(table), []
    for k, _, _ in pairs:
        row = {"iteration": k, **describe("pruned", models[f"pruned_{k}"], args.imgsz, rows[f"pruned_{k}"]),
               **describe("padded", models[f"padded_{k}"], args.imgsz, rows[f"padded_{k}"]),
               "padded_over_pruned_latency": ratio(rows, f"padded_{k}", f"pruned_{k}")}
        out.append(row)
        print(row)
    final = None
    if "final" in models:
        final = {**describe("baseline", models["baseline"], args.imgsz, rows["baseline"]),
                 **describe("final", models["final"], args.imgsz, rows["final"]),
                 "baseline_over_final_latency": ratio(rows, "baseline", "final")}
        print(final)
    write_json_atomic(RESULTS, {"machine": cpu_info(), "runtime": table["runtime"], "provider": table["provider"],
                                "threads": table["threads"], "imgsz": args.imgsz, "rounds": args.rounds,
                                "runs": args.runs, "rows": out, "final_vs_baseline": final})


if __name__ == "__main__":
    main()
