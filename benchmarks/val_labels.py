"""yolov5's val.py on one checkpoint twice: with its NMS multi-label (as shipped: a box counts once
for every class above the threshold) and single-label (each box its best class, as slimloop's
evaluator keeps it). How much of a gap between the two evaluators that one difference explains.

    python benchmarks/val_labels.py --weights runs/recipe/e19/yolov5/train/weights/best.pt \
        --data runs/recipe/e19/yolov5/dataset/data.yaml --imgsz 160

Needs the dev extra's yolov5 package. Prints and writes benchmarks/results/val_labels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the yolov5 data.yaml of the val split")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "val_labels.json")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from benchmarks.make_yolov5_checkpoint import OFFLINE, _prepare_yolov5

    for key, value in {**OFFLINE, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}.items():
        os.environ.setdefault(key, value)
    _prepare_yolov5()
    from yolov5 import val as y5val

    nms = y5val.non_max_suppression
    result = {"weights": str(args.weights), "imgsz": args.imgsz}
    try:
        for label, multi in (("multi_label", True), ("single_label", False)):
            y5val.non_max_suppression = lambda *a, _multi=multi, **k: nms(*a, **{**k, "multi_label": _multi})
            stats = y5val.run(data=str(args.data), weights=str(args.weights), imgsz=args.imgsz, batch_size=16,
                              device="cpu", workers=0, task="val", project=str(ROOT / "runs" / "val_labels"),
                              name=label, exist_ok=True, plots=False, conf_thres=0.001, iou_thres=0.6)
            result[label] = {"map50": round(float(stats[0][2]), 6), "map": round(float(stats[0][3]), 6)}
            print(label, result[label], flush=True)
    finally:
        y5val.non_max_suppression = nms
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
