"""Stage `latency`: every model the report shows, loaded once and measured side by side in one process
(interleaved rounds) on the target runtime and each `latency.compare` runtime -> metrics/latency.json.

On another machine (an ARM board with onnxruntime, say), the same measurement of copied ONNX files:
    python -m flows.latency --models baseline.onnx final.onnx [--baseline baseline] --out board.json
"""

from __future__ import annotations

from pathlib import Path

from flows.common import base_parser, run_entry
from slimloop.provenance import with_env

MODELS = Path("models")
OUT = Path("metrics/latency.json")


def latency_stage(params, models_dir: Path = MODELS, out: Path = OUT) -> dict:
    """Measure the catalogues of the compress, control and quantize stages; write ``out``."""
    from slimloop.deploy.catalogue import gather
    from slimloop.deploy.latency import latency_table
    from slimloop.errors import ConfigError
    from slimloop.io import write_json_atomic

    files, per_runtime = gather([(models_dir / "compressed" / "onnx", "compress"),
                                 (models_dir / "control" / "onnx", "control"), (models_dir / "int8", "quantize")])
    if "baseline" not in files:
        raise ConfigError(f"{models_dir / 'compressed' / 'onnx' / 'index.json'}: no baseline model; "
                          "run the compress stage first")
    table = latency_table(files, params.latency, baseline="baseline", per_runtime=per_runtime)
    write_json_atomic(out, with_env(table))
    return table


def board_measure(paths: list[Path], latency, baseline: str | None, out: Path | None) -> dict:
    """The same side-by-side measurement of the given model files, named by their stems."""
    from slimloop.deploy.latency import latency_table
    from slimloop.errors import ConfigError
    from slimloop.io import write_json_atomic

    files = {Path(p).stem: Path(p) for p in paths}
    if len(files) != len(paths):
        raise ConfigError("--models: two files share a name (stem); rename one")
    if baseline is not None and baseline not in files:
        raise ConfigError(f"--baseline {baseline}: not among the models ({', '.join(files)})")
    table = latency_table(files, latency, baseline=baseline or next(iter(files)))
    if out is not None:
        write_json_atomic(out, with_env(table))
    return table


def _latency_params(args):
    from pydantic import ValidationError

    from slimloop.config import LatencyParams, load_params
    from slimloop.errors import ConfigError

    base = load_params(args.params).latency if args.params.exists() or not args.models else LatencyParams()
    update = {k: getattr(args, k) for k in ("runtime", "rounds", "runs", "warmup", "threads")
              if getattr(args, k) is not None}
    if args.compare is not None:
        update["compare"] = args.compare
    try:
        return LatencyParams.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from None


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--models", type=Path, nargs="+", help="measure these files instead of the pipeline's")
    parser.add_argument("--baseline", help="with --models: the name (file stem) speed-ups divide by (default: the first)")
    parser.add_argument("--models-dir", type=Path, default=MODELS, help=f"pipeline models (default: {MODELS})")
    parser.add_argument("--out", type=Path, help=f"JSON table (default: {OUT}; with --models: none)")
    parser.add_argument("--runtime", help="onnxruntime | openvino | onnxruntime-cuda | onnxruntime-tensorrt")
    parser.add_argument("--compare", nargs="*", help="further runtimes measured beside it")
    for name in ("rounds", "runs", "warmup", "threads"):
        parser.add_argument(f"--{name}", type=int, help=f"latency.{name} (default: params file, else built-in)")
    args = parser.parse_args(argv)
    from slimloop.deploy.latency import format_text

    latency = _latency_params(args)
    if args.models:
        table = board_measure(args.models, latency, args.baseline, args.out)
    else:
        from slimloop.config import load_params

        params = load_params(args.params).model_copy(update={"latency": latency})
        table = latency_stage(params, args.models_dir, args.out or OUT)
    print(f"{table['machine']['cpu']} ({', '.join(table['machine']['flags']) or 'no listed flags'})")
    for sub in table["tables"].values():
        print(format_text(sub))
    return 0


if __name__ == "__main__":
    run_entry(main)
