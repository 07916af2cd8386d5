"""Transfer: train a saved spec (e.g. models/compressed/spec.json) from scratch on another dataset.

"One ticket to win them all": the structure the loop found on one dataset is trained from random
weights on another. Every width of the spec is kept; the head follows the new dataset's classes and
the anchors are refitted to its boxes. The dataset is a prepared (canonical) folder: import yours
first with `python -m flows.prepare --params yours.yaml`.
"""

from __future__ import annotations

from pathlib import Path

from flows.common import base_parser, run_entry
from slimloop.config import Params, load_params
from slimloop.errors import ConfigError
from slimloop.io import write_json_atomic


def transfer(params: Params, spec: Path, data: Path, out_dir: Path, epochs: int | None = None,
             progress: bool = True) -> dict:
    """Train ``spec`` from scratch on the canonical dataset ``data``; write ``out_dir/metrics.json``.

    Args:
        params: reads ``model.autoanchor``, ``train``, ``eval``, ``retrain.rewind_epoch``.
        spec: a saved spec (JSON or YAML).
        data: a prepared dataset folder (``train`` and ``val`` splits).
        out_dir: the training folder (checkpoints, ``spec.json``, ``model.onnx``, ``metrics.json``).
        epochs: overrides ``train.epochs``.
    """
    from slimloop.baseline import initial_spec, train_and_measure

    if not Path(spec).is_file():
        raise ConfigError(f"--spec: {spec} does not exist")
    if not (Path(data) / "train.json").is_file():
        raise ConfigError(f"--data: {data} is not a prepared dataset (no train.json); run flows.prepare first")
    # the saved structure is trained from random weights: an imported checkpoint plays no part
    update = {"model": params.model.model_copy(update={"spec": str(spec), "checkpoint": None, "checkpoint_yaml": None}),
              "data": params.data.model_copy(update={"out_dir": str(data)})}
    if epochs is not None:
        update["train"] = params.train.model_copy(update={"epochs": epochs})
    params = params.model_copy(update=update)
    if params.train.epochs < 1:
        raise ConfigError("transfer trains from scratch: give --epochs (train.epochs is 0)")
    model_spec, anchors = initial_spec(params)
    record = train_and_measure(model_spec, params, out_dir, progress=progress, stage="transfer")
    record.update(anchors=anchors, spec=str(spec), data=str(data))
    write_json_atomic(Path(out_dir) / "metrics.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="saved spec to train (e.g. models/compressed/spec.json)")
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder (output of flows.prepare)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for checkpoints and metrics.json")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: train.epochs)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    rec = transfer(params, args.spec, args.data, args.out, args.epochs, progress=not args.quiet)
    print(f"transfer: {args.spec} on {args.data}: mAP@0.5 {rec['map50']:.3f}  mAP@0.5:0.95 {rec['map']:.3f}  "
          f"{rec['gflops']:.3f} GFLOPs  {rec['params']:,} params  -> {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_entry(main)
