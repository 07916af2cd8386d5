"""Stage `quantize`: the baseline and the final model in INT8 (ONNX Runtime static QDQ, and OpenVINO's
NNCF where OpenVINO is measured), each evaluated through the runtime -> models/int8, metrics/int8.json."""

from __future__ import annotations

from pathlib import Path

from flows.common import base_parser, run_entry
from slimloop.provenance import with_env

MODELS = Path("models")
OUT = Path("models/int8")
METRICS = Path("metrics")


def quantize_stage(params, models_dir: Path = MODELS, out_dir: Path = OUT, metrics_dir: Path = METRICS) -> dict:
    """Quantize the compress stage's batch-1 ``baseline`` and ``final`` files; write ``int8.json``."""
    from slimloop.deploy.catalogue import read_catalogue
    from slimloop.deploy.quantize import quantize_models
    from slimloop.errors import ConfigError
    from slimloop.io import atomic_dir, read_stage_json, write_json_atomic

    if not params.quant.enabled:
        with atomic_dir(out_dir):
            pass  # an empty folder: nothing INT8 to measure
        record = {"enabled": False}
        write_json_atomic(metrics_dir / "int8.json", with_env(record))
        return record
    catalogue = read_catalogue(models_dir / "compressed" / "onnx", "compress")
    missing = [k for k in ("baseline", "final") if k not in catalogue]
    if missing:
        raise ConfigError(f"{models_dir / 'compressed' / 'onnx' / 'index.json'}: no {', '.join(missing)} model; "
                          "run the compress stage first")
    final = read_stage_json(metrics_dir / "final.json", "compress")
    baseline = read_stage_json(metrics_dir / "baseline.json", "baseline")
    models = {"baseline": (catalogue["baseline"], baseline), "final": (catalogue["final"], final["record"])}
    runtimes = [params.latency.runtime, *params.latency.compare]
    with atomic_dir(out_dir) as tmp:
        record = quantize_models(models, Path(params.data.out_dir), params.eval, params.quant, runtimes, tmp)
    record["files"] = {name: str(out_dir / f"{name}_int8.onnx") for name in models}
    write_json_atomic(metrics_dir / "int8.json", with_env(record))
    return record


def main(argv: list[str] | None = None) -> int:
    from slimloop.config import load_params

    parser = base_parser(__doc__)
    parser.add_argument("--models-dir", type=Path, default=MODELS, help=f"reads compressed/onnx (default: {MODELS})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"INT8 models, replaced as a whole (default: {OUT})")
    parser.add_argument("--metrics-dir", type=Path, default=METRICS,
                        help=f"reads baseline.json and final.json, writes int8.json (default: {METRICS})")
    args = parser.parse_args(argv)
    rec = quantize_stage(load_params(args.params), args.models_dir, args.out, args.metrics_dir)
    if not rec["enabled"]:
        print("quantize: off (quant.enabled: false)")
        return 0
    for name, entry in rec["models"].items():
        print(f"quantize: {name}: mAP@0.5:0.95 fp32 {entry['fp32']['map']:.3f} (ORT; torch {entry['torch']['map']:.3f})"
              f" -> int8 {entry['int8']['map']:.3f}")
    if not rec["within_tolerance"]:
        worst = ", ".join(w["layer"] for w in rec["worst_layers"])
        print(f"quantize: INT8 costs the final model {rec['final_drop']:.3f} mAP@0.5:0.95, more than "
              f"quant.tolerance {rec['tolerance']:g}; layers losing most: {worst}")
    return 0


if __name__ == "__main__":
    run_entry(main)
