"""Training recipe against the original: yolov5's train.py and slimloop's baseline on the same network.

Both train YOLOv5 (`--cfg`, default n) from scratch on the same prepared dataset, at the same image
size, epochs and batch size, on CPU: yolov5 with its default hyperparameters (hyp.scratch-low),
slimloop with `params.yaml`'s `train` section. Both results are measured by slimloop's evaluator
(pycocotools) on the same val images, and yolov5's own val.py too. Writes
`benchmarks/results/recipe_<name>.json`.

    python benchmarks/bench_recipe.py --name e40 --epochs 40 --imgsz 160       # the issue's question
    python benchmarks/bench_recipe.py --name smoke --epochs 3 --imgsz 160       # a quick look

Variants of slimloop's recipe narrow down a gap (`--slimloop-variant label:key=value,...` with
train keys, e.g. `y5hyp:lr0=0.01,warmup_epochs=3,bn_momentum=0.03,schedule=linear`; augment and
loss keys as `augment.mosaic=1.0`, `loss.obj=1.0`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
BASES = {"yolov5n.yaml": "n", "yolov5s.yaml": "s", "yolov5m.yaml": "m"}
# what yolov5's hyp.scratch-low.yaml + train.py defaults do, in slimloop's train keys
YOLOV5_RECIPE = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
                 "schedule": "linear", "bn_momentum": 0.03, "augment.mosaic": 1.0}


def _typed(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def train_params(base: Any, imgsz: int, epochs: int, batch: int, settings: dict[str, Any]) -> Any:
    """``base`` (TrainParams) at the benchmark's size, with ``augment.``/``loss.`` keys nested."""
    top = {k: v for k, v in settings.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
    update = {"imgsz": imgsz, "epochs": epochs, "batch_size": batch, "device": "cpu", "val_every": epochs, **top}
    for section, values in nested.items():
        update[section] = getattr(base, section).model_copy(update=values)
    return base.model_copy(update=update)


def run_slimloop(params: Any, out: Path, label: str) -> dict[str, Any]:
    """slimloop's baseline stage (anchors fitted, trained from scratch, measured) into ``out/label``."""
    from slimloop.baseline import initial_spec, train_and_measure

    started = time.perf_counter()
    spec, anchors = initial_spec(params)
    record = train_and_measure(spec, params, out / label, progress=False, stage=f"recipe-{label}")
    keep = ("map50", "map", "precision", "recall", "missed", "params", "gflops")
    return {**{k: record[k] for k in keep}, "anchors": anchors, "seconds": round(time.perf_counter() - started, 1),
            "checkpoint": str(out / label / "best.safetensors")}


def run_yolov5(data: Path, out: Path, cfg: str, epochs: int, imgsz: int, batch: int, seed: int) -> dict[str, Any]:
    """yolov5's train.py (defaults, from scratch), then both evaluators on its best.pt."""
    from benchmarks.make_yolov5_checkpoint import (
        export_dataset,
        train_yolov5,
        val_slimloop,
        val_yolov5,
    )

    started = time.perf_counter()
    data_yaml = export_dataset(data, out / "dataset")
    best = train_yolov5(data_yaml, out, cfg, epochs, imgsz, batch, seed)
    seconds = round(time.perf_counter() - started, 1)
    return {"slimloop_evaluate": val_slimloop(best, data, imgsz), "yolov5_val": val_yolov5(best, data_yaml, imgsz, out),
            "seconds": seconds, "checkpoint": str(best)}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.make_yolov5_checkpoint import OFFLINE

    from slimloop.config import load_params

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--cfg", default="yolov5n.yaml", choices=sorted(BASES))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--skip-yolov5", action="store_true", help="only slimloop's runs")
    parser.add_argument("--slimloop-variant", action="append", default=[],
                        help="label:key=value,... over params.yaml's train section (repeatable)")
    args = parser.parse_args(argv)
    for key, value in {**OFFLINE, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}.items():
        os.environ.setdefault(key, value)
    params = load_params(args.params)
    params = params.model_copy(update={"model": params.model.model_copy(
        update={"base": BASES[args.cfg], "width_multiple": None, "depth_multiple": None, "spec": None,
                "checkpoint": None, "checkpoint_yaml": None})})
    data = Path(params.data.out_dir)
    out = args.out / args.name
    variants = [("slimloop", {})] + [(t.split(":", 1)[0], {k: _typed(v) for k, v in (
        p.split("=", 1) for p in t.split(":", 1)[1].split(",") if p)}) for t in args.slimloop_variant]
    result: dict[str, Any] = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "cfg": args.cfg,
                              "data": str(data), "threads": os.cpu_count(), "yolov5_recipe": YOLOV5_RECIPE}
    if not args.skip_yolov5:
        result["yolov5"] = run_yolov5(data, out / "yolov5", args.cfg, args.epochs, args.imgsz, args.batch,
                                      params.train.seed)
    for label, settings in variants:
        run = params.model_copy(update={"train": train_params(params.train, args.imgsz, args.epochs, args.batch,
                                                              settings)})
        result[label] = {"settings": settings, **run_slimloop(run, out, label)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"recipe_{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
