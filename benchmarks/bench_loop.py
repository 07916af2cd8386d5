"""The compression loop at another budget than the demo's, on the committed baseline: how far the
final model gets against the loop's targets when the loop may train longer.

It runs the same steps as `dvc repro compress` (sparse, prune, pad, retrain with joint
distillation, decisions) without Prefect, every step timed, into a fresh step store unless
--reuse-store is given (then steps the store holds are served and their time is not measured).
With --control it also trains the control as the `control` stage does (YOLOv5 narrowed to at most
the final model's GFLOPs, from scratch, for the baseline's epochs plus the loop's), so the loop
meets the control at the same budget.

    python benchmarks/bench_loop.py --name long --set compress.iterations=2 \\
        --set compress.step_ratio=0.5 --set retrain.epochs=15 --set compress.tolerance=0.6 [--control]

Writes benchmarks/results/loop_<name>.json and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ("map50", "map", "gflops", "params", "latency_quick_ms")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` overrides (values parsed as YAML), as `dvc exp run -S` takes them."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return raw


def timed(run_step, seconds: list[dict[str, Any]]):
    def run(name, fn, kwargs):
        start = time.perf_counter()
        result = run_step(name, fn, kwargs)
        seconds.append({"step": name, "seconds": round(time.perf_counter() - start, 1)})
        return result

    return run


def summarize(result, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for it in result.iterations:
        for step, record in it["steps"].items():
            if record:
                rows.append({"iteration": it["iteration"], "step": step, **{k: record[k] for k in COLUMNS},
                             "gflops_ratio": round(record["gflops"] / baseline["gflops"], 4),
                             "params_ratio": round(record["params"] / baseline["params"], 4),
                             "map_drop_points": round(100 * (baseline["map"] - record["map"]), 2),
                             **({"epochs": record["epochs"]} if "epochs" in record else {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results go to benchmarks/results/loop_<name>.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params.yaml value (repeatable)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--baseline", type=Path, default=ROOT / "models" / "baseline",
                        help="folder with best.safetensors (and rewind.safetensors)")
    parser.add_argument("--control", action="store_true", help="also train the control at the same budget")
    parser.add_argument("--reuse-store", action="store_true", help="use $SLIMLOOP_CACHE instead of a fresh store")
    args = parser.parse_args()

    from slimloop.config import Params
    from slimloop.io import read_stage_json, write_json_atomic

    params = Params.model_validate(apply_overrides(yaml.safe_load(args.params.read_text()), args.set))
    record = read_stage_json(ROOT / "metrics" / "baseline.json", "baseline")
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        if not args.reuse_store:
            os.environ["SLIMLOOP_CACHE"] = str(Path(tmp) / "store")
        sys.path.insert(0, str(ROOT))  # flows/ is not installed: it runs from the project root
        from flows.compress import local_run_step

        from slimloop.compress.loop import run_loop

        seconds: list[dict[str, Any]] = []
        start = time.perf_counter()
        result = run_loop(args.baseline / "best.safetensors", record, params, ROOT / params.data.out_dir,
                          Path(tmp) / "work", run_step=timed(local_run_step, seconds),
                          rewind_ckpt=args.baseline / "rewind.safetensors")
        wall = time.perf_counter() - start
        control = None
        if args.control:
            from slimloop.compress.control import train_control

            start = time.perf_counter()
            epochs = params.train.epochs + result.epochs_to_final
            control = train_control(args.baseline / "best.safetensors", result.final_record["gflops"],
                                    result.final_record["imgsz"], params, epochs, ROOT / params.data.out_dir,
                                    Path(tmp) / "control")
            control = {**{k: control[k] for k in (*COLUMNS, "width_multiple", "epochs")},
                       "seconds": round(time.perf_counter() - start, 1)}
    base = result.baseline
    rows = summarize(result, base)
    final = result.final_record
    out = {"name": args.name, "overrides": args.set, "machine": platform.machine(), "cpus": os.cpu_count(),
           "wall_seconds": round(wall, 1), "fresh_store": not args.reuse_store, "step_seconds": seconds,
           "baseline": {k: base[k] for k in COLUMNS}, "rows": rows,
           "decision": {"best": result.decision.best, "reason": result.decision.reason},
           "final": {"gflops_ratio": round(final["gflops"] / base["gflops"], 4),
                     "params_ratio": round(final["params"] / base["params"], 4),
                     "map_drop_points": round(100 * (base["map"] - final["map"]), 2),
                     "map50": final["map50"], "map": final["map"]},
           "control": control}
    write_json_atomic(RESULTS / f"loop_{args.name}.json", out)
    print(f"baseline: mAP@0.5 {base['map50']:.3f}, mAP@0.5:0.95 {base['map']:.3f}, {base['gflops']:.3f} GFLOPs")
    print("| iteration | step | mAP@0.5 | mAP@0.5:0.95 | GFLOPs x | params x | drop (points) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['iteration']} | {r['step']} | {r['map50']:.3f} | {r['map']:.3f} | {r['gflops_ratio']:.3f} | "
              f"{r['params_ratio']:.3f} | {r['map_drop_points']:.1f} |")
    print(f"final: {out['final']}; {out['decision']}; wall {wall / 60:.1f} min")
    if control:
        print(f"control: {control}")


if __name__ == "__main__":
    main()
