"""Train a YOLOv5 checkpoint with the original: yolov5's own train.py (the `yolov5` package, 7.0.14) on
the embedded dataset, exported with slimloop.data.yolo.export_yolo. Its best.pt is what a user brings.

    python -m benchmarks.make_yolov5_checkpoint --data data/prepared --out runs/yolov5 --epochs 5 \
        --imgsz 160 --cfg yolov5n.yaml
    cp runs/yolov5/train/weights/best.pt imports/best.pt

Runs on CPU with yolov5's default hyperparameters (data/hyps/hyp.scratch-low.yaml), from scratch
(no pretrained weights: nothing is downloaded), and no plots (they want a font from the internet).
Also prints yolov5's own val.py on the same val images for the slimloop-vs-yolov5 comparison
(`--val-only best.pt` skips the training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# yolov5 imports ultralytics, which checks for updates and settings unless told not to
OFFLINE = {"YOLO_OFFLINE": "1", "YOLOv5_AUTOINSTALL": "false", "YOLO_AUTOINSTALL": "false",
           "WANDB_MODE": "disabled", "COMET_MODE": "disabled", "MPLBACKEND": "Agg"}


def export_dataset(data: Path, out: Path) -> Path:
    """The canonical dataset as a YOLO dataset whose data.yaml carries an absolute ``path``."""
    import yaml

    from slimloop.data.yolo import export_yolo

    data_yaml = export_yolo(data, out)
    doc = yaml.safe_load(data_yaml.read_text())
    doc["path"] = str(out.resolve())
    data_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    return data_yaml


def _prepare_yolov5() -> None:
    """Keep yolov5 off the network. Two additions of the pip package's fork that upstream
    ultralytics/yolov5 does not have: it asks the Hugging Face hub about every weights name before
    using a local file (no hub here, none needed), and train.py imports the `roboflow` client for an
    upload option (not installed: a module that refuses to be used stands in). And both forks fetch
    a font for their plots when they check a dataset (plots are off). Plus numpy 2.4 compatibility."""
    import types

    if "yolov5.utils.roboflow" not in sys.modules:
        stub = types.ModuleType("yolov5.utils.roboflow")

        class RoboflowConnector:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("roboflow upload is not available in this benchmark")

        stub.RoboflowConnector = RoboflowConnector
        sys.modules["yolov5.utils.roboflow"] = stub
    import yolov5.models.common as common
    import yolov5.utils.downloads as downloads
    import yolov5.utils.general as general

    for module in (common, downloads):
        module.attempt_download_from_hub = lambda *a, **k: None
    general.check_font = lambda *a, **k: None  # downloads Arial.ttf for plots; plots are off
    import numpy as np

    if not hasattr(np, "trapz"):  # yolov5's compute_ap integrates with np.trapz, gone in numpy 2.4
        np.trapz = np.trapezoid


def train_yolov5(data_yaml: Path, out: Path, cfg: str, epochs: int, imgsz: int, batch: int, seed: int) -> Path:
    """yolov5's train.py at its default hyperparameters, from scratch, on CPU; returns best.pt."""
    _prepare_yolov5()
    import yolov5
    from yolov5 import train as y5train

    cfg_path = Path(yolov5.__file__).parent / "models" / cfg
    sys.argv = sys.argv[:1]  # train.parse_opt reads the command line
    y5train.run(data=str(data_yaml), cfg=str(cfg_path), weights="", epochs=epochs, imgsz=imgsz,
                batch_size=batch, device="cpu", workers=0, project=str(out), name="train", exist_ok=True,
                noplots=True, seed=seed)
    return out / "train" / "weights" / "best.pt"


def val_yolov5(weights: Path, data_yaml: Path, imgsz: int, out: Path) -> dict[str, float]:
    """yolov5's val.py on the val split: mAP@0.5 and mAP@0.5:0.95 (its own 101-point interpolation)."""
    _prepare_yolov5()
    from yolov5 import val as y5val

    results = y5val.run(data=str(data_yaml), weights=str(weights), imgsz=imgsz, batch_size=16, device="cpu",
                        workers=0, task="val", project=str(out), name="val", exist_ok=True, plots=False,
                        conf_thres=0.001, iou_thres=0.6)
    mp, mr, map50, map_ = results[0][:4]  # upstream returns 3 values, the pip fork 4; both lead with these
    return {"precision": float(mp), "recall": float(mr), "map50": float(map50), "map": float(map_)}


def val_slimloop(weights: Path, data: Path, imgsz: int) -> dict[str, float]:
    """slimloop's evaluator (pycocotools) on the same images, after importing the checkpoint."""
    from slimloop.config import EvalParams
    from slimloop.data.canonical import read_split
    from slimloop.evaluate import evaluate
    from slimloop.model.yolov5_import import import_yolov5

    names = tuple(read_split(data, "train").names)
    model = import_yolov5(weights, names=names).model
    rec = evaluate(model, data, "val", imgsz, EvalParams(conf_thres=0.001, nms_iou=0.6), progress=False)
    return {k: rec[k] for k in ("precision", "recall", "map50", "map")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="canonical dataset (flows.prepare)")
    parser.add_argument("--out", type=Path, default=Path("runs/yolov5"))
    parser.add_argument("--cfg", default="yolov5n.yaml", help="a model yaml bundled with the yolov5 package")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-only", type=Path, default=None, help="evaluate this best.pt, do not train")
    args = parser.parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    # yolov5 reloads its own checkpoints (strip_optimizer, val.py) with a bare torch.load, which torch
    # >= 2.6 refuses for its pickled classes: let the original tool read the files it just wrote.
    # Calls that pass weights_only=True (slimloop's state-dict reader) are not affected; slimloop
    # itself never unpickles a checkpoint.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    data_yaml = export_dataset(args.data, args.out / "dataset")
    best = args.val_only or train_yolov5(data_yaml, args.out, args.cfg, args.epochs, args.imgsz, args.batch, args.seed)
    result = {"weights": str(best), "imgsz": args.imgsz,
              "yolov5_val": val_yolov5(best, data_yaml, args.imgsz, args.out),
              "slimloop_evaluate": val_slimloop(best, args.data, args.imgsz)}
    print(json.dumps(result, indent=2))
    (args.out / "evaluators.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
