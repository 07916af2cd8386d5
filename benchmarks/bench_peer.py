"""The peer, side by side: the same baseline compressed by torch-pruning to the final model's
GFLOPs, then finetuned with slimloop's final-retraining recipe for as many epochs as slimloop's
lineage trained; mAP, params and side-by-side latency against slimloop's final model.

    python benchmarks/bench_peer.py [--importance bn_scale magnitude] [--epochs N]

torch-pruning (the dev extra's torch-pruning==1.6.1) with its defaults: `MetaPruner`, one shot,
per-layer ratio (`global_pruning=False`), group-normalised importance (`normalizer="mean"`),
`round_to=8`, the detection head's output convs ignored (as its YOLOv5 example does). Its ratio is
found by bisection so that the pruned model's GFLOPs just do not exceed slimloop's final model's.
Its cut is then applied by slimloop's own surgery (the channels torch-pruning removed, read from
its pruning history; checked to keep exactly the filters torch-pruning kept), so both models are
finetuned, evaluated and exported by the same code.

Runs in the project folder after `dvc repro` (models/baseline, models/compressed, data/prepared,
metrics/final.json). Writes benchmarks/results/peer.json and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peer.json"
IMPORTANCE = ("bn_scale", "magnitude")


def tp_keep(model, topo, importance: str, ratio: float, imgsz: int):
    """torch-pruning's cut of ``model`` at ``ratio``: slimloop keep-masks per channel group, and the
    network torch-pruning made (to check that slimloop's surgery of those masks computes the same)."""
    import torch
    import torch_pruning as tp

    from slimloop.model.build import conv_modules

    net = copy.deepcopy(model).eval()
    imp = tp.importance.BNScaleImportance() if importance == "bn_scale" else tp.importance.MagnitudeImportance(p=2)
    convs = conv_modules(net)
    head = [m for name, m in net.named_modules() if name.startswith("detect.m.") and isinstance(m, torch.nn.Conv2d)]
    pruner = tp.pruner.MetaPruner(net, torch.zeros(1, 3, imgsz, imgsz), importance=imp, pruning_ratio=ratio,
                                  round_to=8, ignored_layers=head)
    pruner.step()
    removed: dict[str, set[int]] = {}
    for layer, is_out, idxs in pruner.pruning_history():
        if is_out and layer.endswith(".conv") and layer[: -len(".conv")] in convs:
            removed.setdefault(layer[: -len(".conv")], set()).update(int(i) for i in idxs)
    keep = {}
    for g, group in topo.groups.items():
        mask = torch.ones(group.width, dtype=torch.bool)
        for member in group.members:  # coupled convs: torch-pruning removes the same channels from each
            gone = sorted(removed.get(member, ()))
            mask[gone] = False
        keep[g] = mask
    return keep, net


def find_ratio(model, topo, importance: str, target_gflops: float, imgsz: int) -> tuple[float, dict]:
    """The smallest ratio whose cut has at most ``target_gflops`` (bisection, 12 steps), and its masks."""
    from slimloop.compress.surgery import prune_model
    from slimloop.profile import gflops

    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        mid = (lo + hi) / 2
        keep, net = tp_keep(model, topo, importance, mid, imgsz)
        ours = prune_model(model, keep).eval()
        if gflops(ours, imgsz) <= target_gflops:
            hi, best = mid, (mid, keep, net, ours)
        else:
            lo = mid
    if best is None:
        raise SystemExit(f"torch-pruning ({importance}) cannot reach {target_gflops} GFLOPs")
    return best


def same_selection(theirs, ours) -> bool:
    """Whether slimloop's cut kept exactly the filters torch-pruning kept: every conv weight equal.
    (Outputs differ a little: slimloop's surgery folds the constant output of each removed channel
    into the next layer's BN statistics or bias, where torch-pruning drops it.)"""
    import torch

    from slimloop.model.build import conv_modules

    a, b = conv_modules(theirs), conv_modules(ours)
    return a.keys() == b.keys() and all(
        a[k].conv.weight.shape == b[k].conv.weight.shape and torch.equal(a[k].conv.weight, b[k].conv.weight) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--importance", nargs="+", default=list(IMPORTANCE), choices=IMPORTANCE)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: slimloop's epochs to the final model)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from slimloop.checkpoint import load_model
    from slimloop.compress.groups import topology
    from slimloop.compress.prune import channel_scores
    from slimloop.compress.retrain import retrain_step
    from slimloop.compress.steps import surgery_step
    from slimloop.config import load_params
    from slimloop.deploy.export import export_onnx
    from slimloop.deploy.latency import measure_files
    from slimloop.io import write_json_atomic
    from slimloop.model.build import conv_modules
    from slimloop.provenance import environment
    from slimloop.store.entries import store_dir

    p = load_params(args.params)
    imgsz = p.compress.imgsz or p.train.imgsz
    final = json.loads((ROOT / "metrics" / "final.json").read_text())
    epochs = args.epochs or final["epochs_to_final"]
    base_ckpt = ROOT / "models" / "baseline" / "best.safetensors"
    final_ckpt = ROOT / "models" / "compressed" / "final.safetensors"
    model = load_model(base_ckpt)
    topo = topology(model.spec)
    lr0 = p.compress.final_lr0 or p.train.lr0
    recipe = p.retrain.model_copy(update={"mode": "finetune", "epochs": epochs, "lr0": lr0, "warmup_epochs": 0,
                                          "scratch_budget": False})
    work = store_dir() / "work" / "bench_peer"
    rows = [{"name": "slimloop final", **{k: final["record"][k] for k in ("map", "map50", "gflops", "params")},
             "epochs": final["epochs_to_final"], "ratio": None}]
    files = {"baseline": ROOT / "models" / "compressed" / "onnx" / "baseline.onnx"}
    files["slimloop final"] = export_onnx(load_model(final_ckpt), work / "slimloop_final.onnx", imgsz)
    for importance in args.importance:
        start = time.perf_counter()
        ratio, keep, theirs, ours = find_ratio(model, topo, importance, final["record"]["gflops"], imgsz)
        if not same_selection(theirs, ours):
            raise SystemExit("slimloop's cut of torch-pruning's masks does not keep the filters torch-pruning kept")
        scores = channel_scores(model, topo, "gamma")  # only ordering ties in the masks file; the cut is keep
        cut = surgery_step(model, base_ckpt, keep, scores, "peer", p.prune, Path(p.data.out_dir), p.eval,
                           work / importance / "cut", imgsz, p.prune.recalibrate, importance=importance,
                           tp_ratio=round(ratio, 4))
        tuned = retrain_step(cut.checkpoint, Path(p.data.out_dir), recipe, p.train.model_copy(update={"lr0": lr0}),
                             p.eval, work / importance / "finetune", imgsz=imgsz)
        net = load_model(tuned.checkpoint)
        name = f"torch-pruning {importance}"
        files[name] = export_onnx(net, work / f"{importance}.onnx", imgsz)
        rows.append({"name": name, "ratio": round(ratio, 4), "map_after_cut": cut.record["map"],
                     **{k: tuned.record[k] for k in ("map", "map50", "gflops", "params")}, "epochs": epochs,
                     "widths_multiple_of_8": all(c.conv.out_channels % 8 == 0 for c in conv_modules(net).values()),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    table = measure_files(files, p.latency.runtime, p.latency, baseline="baseline")
    by_name = {r["name"]: r for r in table["rows"]}
    for row in rows:
        lat = by_name[row["name"]]
        row.update(latency_ms=lat["median_ms"], speedup=lat["speedup"], speedup_range=[lat["speedup_min"], lat["speedup_max"]])
    write_json_atomic(RESULTS, {"imgsz": imgsz, "recipe": recipe.model_dump(), "runtime": p.latency.runtime,
                                "rows": rows, "latency": table, "env": environment(ROOT)})
    print(f"{'model':<26} {'mAP':>6} {'mAP50':>6} {'GFLOPs':>8} {'params':>9} {'speed-up vs baseline':>22}")
    for r in rows:
        print(f"{r['name']:<26} {r['map']:>6.3f} {r['map50']:>6.3f} {r['gflops']:>8.4f} {r['params']:>9,} "
              f"{r['speedup']:>8.2f}x [{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}]")


if __name__ == "__main__":
    main()
