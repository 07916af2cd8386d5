"""Does the loop's result hold on other seeds and other data? The whole pipeline (baseline, loop,
final retraining, control) with the committed params on seeds 0-2 of the embedded dataset and on
a generated YOLO dataset unlike it (benchmarks/make_unseen.py), each in a fresh clone.

    python benchmarks/bench_robust.py [--runs seed0 seed1 seed2 unseen] [--out benchmarks/results/robust.json]

About 25 minutes a run on 2 cores. Reports, per run and as mean and min-max over the runs, the
final model's GFLOPs and params ratios, mAP@0.5:0.95 against its baseline and against the
control, whether every target was met, and why the loop stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "seed0": {"data.seed": 0, "train.seed": 0},
    "seed1": {"data.seed": 1, "train.seed": 1},
    "seed2": {"data.seed": 2, "train.seed": 2},
    "unseen": {"data.source": "yolo", "data.yolo": {"data_yaml": "{unseen}/yolo/data.yaml"}},
}


def set_params(path: Path, overrides: dict, unseen: Path) -> None:
    """Apply ``section.key: value`` overrides to a params file (comments are not kept: a scratch clone)."""
    raw = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        if isinstance(value, dict):
            value = {k: v.format(unseen=unseen) for k, v in value.items()}
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def run_one(name: str, work: Path, unseen: Path) -> dict:
    clone = work / name
    if not (clone / "metrics" / "control.json").exists() or not (clone / ".done").exists():
        subprocess.run(["rm", "-rf", str(clone)], check=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        set_params(clone / "params.yaml", RUNS[name], unseen)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": f"{clone / 'src'}{os.pathsep}{clone}", "SLIMLOOP_CACHE": str(work / "store"),
               "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg"}
        start = time.perf_counter()
        with open(work / f"{name}.log", "w") as log:
            subprocess.run(["dvc", "repro"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        (clone / ".done").write_text(f"{time.perf_counter() - start:.0f}\n")
    return summarize(name, clone)


def summarize(name: str, clone: Path) -> dict:
    m = clone / "metrics"
    base, final, control = (json.loads((m / f).read_text()) for f in ("baseline.json", "final.json", "control.json"))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    rec = final["record"]
    ratios = {"gflops_ratio": rec["gflops"] / base["gflops"], "params_ratio": rec["params"] / base["params"]}
    targets = params["target"]
    met = {k: ratios[k] <= targets[k] + 1e-6 for k in ("gflops_ratio", "params_ratio") if targets.get(k)}
    return {"run": name, **{k: round(v, 4) for k, v in ratios.items()}, "baseline_map": base["map"],
            "final_map": rec["map"], "vs_baseline_points": round(100 * (rec["map"] - base["map"]), 2),
            "control_map": control.get("map"), "vs_control_points":
                round(100 * (rec["map"] - control["map"]), 2) if control.get("map") is not None else None,
            "reason": final["reason"], "targets_met": met, "tolerance_met": final.get("tolerance_met"),
            "seconds": int((clone / ".done").read_text()) if (clone / ".done").exists() else None}


def spread(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimloop-robust"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robust.json")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from make_unseen import make_unseen  # benchmarks/ is on sys.path when this runs as a script
    from slimloop.io import write_json_atomic

    args.work.mkdir(parents=True, exist_ok=True)
    unseen = args.work / "unseen-data"
    if "unseen" in args.runs and not (unseen / "yolo" / "data.yaml").exists():
        make_unseen(unseen)
    rows = []
    keys = ("gflops_ratio", "params_ratio", "vs_baseline_points", "vs_control_points")
    for name in args.runs:  # the results file is rewritten after every run: a cut-off bench keeps its runs
        rows.append(run_one(name, args.work, unseen))
        print(json.dumps(rows[-1]), flush=True)
        write_json_atomic(args.out, {"runs": rows, "summary": {k: spread(rows, k) for k in keys}})
    for k in keys:
        print(k, spread(rows, k))


if __name__ == "__main__":
    main()
