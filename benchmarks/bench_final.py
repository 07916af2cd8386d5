"""The final retraining, varied on the demo's final iteration: finetune or scratch, epochs, lr, distillation.

Each variant is `compress.final_retrain` run on the model `metrics/iterations/iter_<k>.json` names
(the final iteration of the last `dvc repro`), through the step store, so the variant equal to
`params.yaml` is served from the demo's own step. Writes `benchmarks/results/final_<name>.json`.

    python benchmarks/bench_final.py --name kd --variant demo \\
        --variant kd:distill=1 --variant kd_light:distill=1,kl=0.1,feature=0.05 \\
        --variant scratch:mode=scratch,lr0=0.02

A variant is `label:key=value,...` with keys mode (finetune | scratch), epochs, lr0, distill (0 | 1)
and the distillation weights obj, cls, kl, box, feature, temperature; unset keys come from params.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DISTILL_KEYS = ("obj", "cls", "kl", "box", "feature", "temperature")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``label:key=value,...`` -> ``(label, {key: value})``."""
    label, _, rest = text.partition(":")
    pairs = [p for p in rest.split(",") if p]
    bad = [p for p in pairs if "=" not in p]
    if not label or bad:
        raise SystemExit(f"--variant {text!r}: expected label:key=value,... ({', '.join(bad) or 'no label'})")
    return label, dict(p.split("=", 1) for p in pairs)


def pad_masks(ckpt: Path, store: Path) -> Path:
    """The masks of the pad step whose checkpoint is the parent of ``ckpt`` (the retrained model)."""
    from slimloop.checkpoint import file_sha256, load_checkpoint

    parent = load_checkpoint(ckpt).meta["parent"]
    for manifest in store.glob("*/step.json"):
        step = json.loads(manifest.read_text())
        if step["name"] == "pad" and Path(step["checkpoint"]).exists() and file_sha256(step["checkpoint"]) == parent:
            return Path(step["extra"]["masks"])
    raise SystemExit(f"no pad step in {store} is the parent of {ckpt}: run `dvc repro` first")


def variant_kwargs(params: Any, ckpt: Path, masks: list[Path], settings: dict[str, str], work: Path) -> dict:
    """``retrain_step`` kwargs as the loop builds them for its final retraining, with ``settings`` applied."""
    from slimloop.compress.steps import Lineage

    c = params.compress
    mode = settings.get("mode", c.final_retrain if c.final_retrain != "off" else "finetune")
    epochs = int(settings.get("epochs", c.final_epochs or params.train.epochs))
    lr0 = float(settings.get("lr0", c.final_lr0 or params.train.lr0))
    retrain = params.retrain.model_copy(
        update={"mode": mode, "epochs": epochs, "lr0": lr0, "warmup_epochs": 0, "scratch_budget": False})
    kwargs = dict(ckpt=ckpt, data_root=ROOT / params.data.out_dir, retrain=retrain,
                  train_params=params.train.model_copy(update={"lr0": lr0}), eval_params=params.eval,
                  out_dir=work, imgsz=c.imgsz or params.train.imgsz, progress=False)
    if settings.get("distill", "1" if c.final_distill else "0") == "1":
        weights = {k: float(v) for k, v in settings.items() if k in DISTILL_KEYS}
        kwargs.update(distill=params.distill.model_copy(update=weights),
                      teacher=Lineage(ROOT / "models/baseline/best.safetensors", tuple(masks)))
    return kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results go to benchmarks/results/final_<name>.json")
    parser.add_argument("--variant", action="append", required=True, help="label:key=value,... (repeatable)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    from flows.compress import local_run_step

    from slimloop.compress.retrain import retrain_step
    from slimloop.config import load_params
    from slimloop.io import write_json_atomic
    from slimloop.store.entries import store_dir
    from slimloop.store.lineage import local

    params = load_params(args.params)
    final = json.loads((ROOT / "metrics/final.json").read_text())
    k = int(final["final_iteration"])
    if k == 0:
        raise SystemExit("metrics/final.json: the final model is the baseline; nothing to retrain")
    its = [local(json.loads((ROOT / f"metrics/iterations/iter_{i}.json").read_text())) for i in range(1, k + 1)]
    masks = [pad_masks(Path(it["checkpoint"]), store_dir()) for it in its]
    ckpt = Path(its[-1]["checkpoint"])
    rows = []
    for text in args.variant:
        label, settings = parse_variant(text)
        kwargs = variant_kwargs(params, ckpt, masks, settings, store_dir() / "work" / "bench_final" / label)
        start = time.perf_counter()
        result = local_run_step("final_retrain", retrain_step, kwargs)
        rec = result.record
        rows.append({"variant": label, "settings": settings, "mode": kwargs["retrain"].mode,
                     "epochs": kwargs["retrain"].epochs, "lr0": kwargs["retrain"].lr0,
                     "distill": rec.get("distill"), "distill_terms": rec.get("distill_terms"),
                     "map50": rec["map50"], "map": rec["map"], "missed": rec["missed"],
                     "baseline_map": final["baseline"]["map"], "loop_map": its[-1]["steps"][its[-1]["final_step"]]["map"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{label:>12}: {rows[-1]['mode']} {rows[-1]['epochs']} epochs lr {rows[-1]['lr0']} "
              f"distill {rows[-1]['distill']}: mAP@0.5 {rec['map50']:.3f}  mAP@0.5:0.95 {rec['map']:.3f}  "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"final_{args.name}.json", {"iteration": k, "checkpoint": str(ckpt), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
