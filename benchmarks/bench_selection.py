"""Does the gamma ranking choose better channels than filter L1 or chance? The same structure (the
widths iteration 1 of the loop chose), its channels picked by each criterion, each then finetuned
with the same recipe; mAP right after the cut and after the finetune.

    python benchmarks/bench_selection.py --name demo [--params params.yaml] [--epochs 2] [--sparse-lam 0.3]

Runs in the project folder after `dvc repro compress` (models/baseline, data/prepared): the
sparse step is the loop's own, served from the step store. Writes
benchmarks/results/selection_<name>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CRITERIA = ("gamma", "l1", "random")


def same_widths(scores, counts):
    """Keep masks with ``counts[g]`` channels per group, the highest ``scores`` of each."""
    import torch

    masks = {}
    for g, s in scores.items():
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[s.topk(counts[g]).indices] = True
        masks[g] = mask
    return masks


def run(params, name: str, epochs: int | None, seeds: list[int]) -> dict:
    from flows.compress import local_run_step

    from slimloop.checkpoint import load_model
    from slimloop.compress.groups import topology
    from slimloop.compress.pad import pad_step
    from slimloop.compress.prune import channel_scores, prune_step
    from slimloop.compress.retrain import retrain_step
    from slimloop.compress.sparse import sparse_train_step
    from slimloop.compress.steps import load_masks, surgery_step
    from slimloop.store.entries import store_dir

    p, imgsz = params, params.compress.imgsz or params.train.imgsz
    common = dict(data_root=Path(p.data.out_dir), eval_params=p.eval, imgsz=imgsz)
    work = store_dir() / "work" / f"bench_selection_{name}"
    base = ROOT / "models" / "baseline" / "best.safetensors"
    sparse = local_run_step("sparse_train", sparse_train_step, dict(
        ckpt=base, sparse=p.sparse, train_params=p.train, out_dir=work / "sparse", progress=False, **common))
    pruned = local_run_step("prune", prune_step, dict(
        ckpt=sparse.checkpoint, prune=p.prune, ratio=p.compress.step_ratio, land=None, seed=p.train.seed,
        out_dir=work / "prune", **common))
    padded = local_run_step("pad", pad_step, dict(
        ckpt=sparse.checkpoint, masks=Path(pruned.extra["masks"]), pad=p.pad, recalibrate=p.prune.recalibrate,
        out_dir=work / "pad", **common))
    counts = {g: int(m.sum()) for g, m in load_masks(Path(padded.extra["masks"]))[0].items()}
    model = load_model(sparse.checkpoint)
    topo = topology(model.spec)
    retrain = p.retrain if epochs is None else p.retrain.model_copy(update={"epochs": epochs})
    rows = []
    for criterion in CRITERIA:
        for seed in (seeds if criterion == "random" else [0]):
            label = criterion if criterion != "random" else f"random_{seed}"
            start = time.perf_counter()
            keep = same_widths(channel_scores(model, topo, criterion, seed), counts)
            cut = surgery_step(model, sparse.checkpoint, keep, channel_scores(model, topo, criterion, seed),
                               "pad", p.pad, common["data_root"], p.eval, work / label / "cut", imgsz,
                               p.prune.recalibrate)
            tuned = retrain_step(cut.checkpoint, common["data_root"], retrain, p.train, p.eval,
                                 work / label / "retrain", imgsz=imgsz)
            rows.append({"criterion": label, "gflops": cut.record["gflops"], "params": cut.record["params"],
                         "map_after_cut": cut.record["map"], "map_after_finetune": tuned.record["map"],
                         "map50_after_finetune": tuned.record["map50"], "epochs": tuned.record["epochs"],
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return {"structure": {"step_ratio": p.compress.step_ratio, "pad_multiple": p.pad.multiple,
                          "kept_channels": sum(counts.values())},
            "sparse": {k: sparse.record.get(k) for k in ("map", "gamma_below_threshold", "lam_scale")},
            "sparse_params": p.sparse.model_dump(), "baseline_sparse": p.baseline.model_dump(),
            "retrain": retrain.model_dump(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="finetune epochs (default retrain.epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the random criterion")
    parser.add_argument("--sparse-lam", type=float, default=None, help="sparse.lam of the sparse step (default: params)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from slimloop.config import load_params
    from slimloop.io import write_json_atomic
    from slimloop.provenance import environment

    params = load_params(args.params)
    if args.sparse_lam is not None:
        params = params.model_copy(update={"sparse": params.sparse.model_copy(update={"lam": args.sparse_lam})})
    result = run(params, args.name, args.epochs, args.seeds)
    result["env"] = environment(ROOT)
    write_json_atomic(RESULTS / f"selection_{args.name}.json", result)
    print(f"{'criterion':<12} {'after cut':>10} {'finetuned':>10}")
    for r in result["rows"]:
        print(f"{r['criterion']:<12} {r['map_after_cut']:>10.3f} {r['map_after_finetune']:>10.3f}")


if __name__ == "__main__":
    main()
