"""Subnormal weights against flushed ones, side by side: the same detector with one channel of every
convolution set to a subnormal value (what a pruned-to-nothing channel of sparse training looks like),
exported unflushed and run without denormals-as-zero, against the same model as slimloop exports and
runs it (subnormals flushed at export, ONNX Runtime told to treat denormals as zero).

    python benchmarks/bench_denormal.py [--base n] [--imgsz 160] [--rounds 7] [--runs 100]

Writes benchmarks/results/denormal.json. The tests check the behaviour (no subnormal constant in an
exported file, the session option set); the timing belongs here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from slimloop.config import LatencyParams
from slimloop.deploy.export import count_subnormals, export_onnx
from slimloop.deploy.latency import cpu_info, lookup, measure_files
from slimloop.deploy.runtimes import default_threads, ort_runner
from slimloop.io import write_json_atomic
from slimloop.model import build_model, yolov5_spec
from slimloop.model.build import conv_modules

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "denormal.json"


def subnormal_model(base: str, fraction: float):
    """YOLOv5 ``base`` whose first ``fraction`` of output channels per conv carry subnormal weights."""
    torch.manual_seed(0)
    model = build_model(yolov5_spec(base, nc=2, names=("barcode", "qrcode"))).eval()
    tiny = float(np.finfo(np.float32).tiny)
    with torch.no_grad():
        for conv in conv_modules(model).values():
            n = max(1, int(fraction * conv.conv.out_channels))
            conv.conv.weight[:n] = tiny / 8 * torch.sign(conv.conv.weight[:n])
            conv.bn.weight[:n], conv.bn.running_var[:n] = 1.0, 1.0 - conv.bn.eps  # folding keeps them subnormal
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="n")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of channels with subnormal weights")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    model = subnormal_model(args.base, args.fraction)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"subnormal": export_onnx(model, Path(tmp) / "subnormal.onnx", args.imgsz, flush_denormals=False),
                 "flushed": export_onnx(model, Path(tmp) / "flushed.onnx", args.imgsz)}
        counts = {n: count_subnormals(p) for n, p in files.items()}

        def load(runtime, path, threads):  # the unflushed file also runs without denormals-as-zero
            return ort_runner(path, threads, denormals_as_zero=Path(path).stem == "flushed")

        params = LatencyParams(rounds=args.rounds, runs=args.runs, warmup=20, threads=args.threads)
        table = measure_files(files, "onnxruntime", params, baseline="subnormal", loader=load)
    rows = lookup(table)
    result = {"machine": cpu_info(), "threads": table["threads"], "imgsz": args.imgsz, "base": args.base,
              "fraction": args.fraction, "rounds": args.rounds, "runs": args.runs, "subnormal_constants": counts,
              "rows": table["rows"], "flushed_speedup": {k: rows["flushed"][k] for k in
                                                        ("speedup", "speedup_min", "speedup_max")}}
    print(result["subnormal_constants"], result["flushed_speedup"])
    write_json_atomic(RESULTS, result)


if __name__ == "__main__":
    main()
