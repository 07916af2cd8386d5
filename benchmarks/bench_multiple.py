"""Which width multiple runs fastest here? Each iteration's pruned structure (from the last
`dvc repro`) padded to 1, 4, 8, 16 and 32 and measured side by side, with the code
`pad.multiple: auto` uses (slimloop.compress.pad.auto_pad_table), on the target runtime and the
compare runtimes; the multiple `auto` would choose under `pad.max_growth`.

    python benchmarks/bench_multiple.py [--iterations 3] [--rounds 7] [--runs 50] [--compare openvino]

Reads metrics/iterations/iter_<k>.json and the step store ($SLIMLOOP_CACHE) of that run: the
sparse-trained checkpoint and the prune step's masks. Writes benchmarks/results/multiple.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "multiple.json"


def prune_inputs(iteration: dict) -> tuple[Path, Path]:
    """(sparse-trained checkpoint, prune masks) of one iteration record, on this machine's store."""
    from slimloop.store.entries import MANIFEST
    from slimloop.store.lineage import local

    checkpoints = local(iteration["checkpoints"])
    manifest = Path(checkpoints["pruned"]).parent / MANIFEST
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not in the step store; run `dvc repro` (or `dvc pull`) first")
    masks = local(json.loads(manifest.read_text()))["extra"]["masks"]
    return Path(checkpoints["sparse"]), Path(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=None, help="default: every one recorded")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--compare", nargs="*", default=["openvino"])
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from slimloop.checkpoint import load_model
    from slimloop.compress.pad import auto_pad_table
    from slimloop.compress.steps import load_masks
    from slimloop.config import load_params
    from slimloop.deploy.latency import cpu_info
    from slimloop.io import write_json_atomic
    from slimloop.provenance import environment

    params = load_params(args.params)
    latency = params.latency.model_copy(update={"pad_rounds": args.rounds, "pad_runs": args.runs,
                                                "compare": args.compare})
    imgsz = params.compress.imgsz or params.train.imgsz
    files = sorted((ROOT / "metrics" / "iterations").glob("iter_*.json"), key=lambda p: int(p.stem[5:]))
    tables = []
    for path in files:
        it = json.loads(path.read_text())
        if args.iterations and it["iteration"] not in args.iterations:
            continue
        sparse, masks = prune_inputs(it)
        keep, scores = load_masks(masks)
        table = auto_pad_table(load_model(sparse), keep, scores, imgsz, params.pad, latency)
        table["iteration"] = it["iteration"]
        tables.append(table)
        names = list(table["runtime_names"])
        print(f"iteration {it['iteration']}: auto chooses {table['chosen']} on {table['runtime']}")
        print(f"{'multiple':>8} {'GFLOPs':>9} {'growth':>7} " + " ".join(f"{n + ' ms':>22}" for n in names))
        for c in table["candidates"]:
            cells = " ".join(f"{c['latency'][n]['median_ms']:>9.3f} [{c['latency'][n]['iqr_ms'][0]:.3f}-"
                             f"{c['latency'][n]['iqr_ms'][1]:.3f}]" for n in names)
            print(f"{c['multiple']:>8} {c['gflops']:>9.4f} {c['growth']:>+7.1%} {cells}"
                  f"{'' if c['within_growth'] else '  (over max_growth)'}")
    write_json_atomic(RESULTS, {"imgsz": imgsz, "machine": cpu_info(), "tables": tables, "env": environment(ROOT)})
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
