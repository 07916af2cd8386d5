"""Training throughput (images/s, forward + backward + step) and inference latency of the default model.

Measures the default spec (params.yaml `model`) at the default training size and at 640 px:
training images/s on random data, batch-1 latency on ONNX Runtime CPU and torch eager, GFLOPs.
All numbers come from one process, side by side, with the thread count recorded.

    python benchmarks/bench_model.py [--params params.yaml] [--sizes 192 640] [--steps 6]

Writes benchmarks/results/model.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from slimloop.config import EvalParams, LossParams, load_params
from slimloop.io import write_json_atomic
from slimloop.model import ComputeLoss, build_model, yolov5_spec
from slimloop.profile import profile

RESULTS = Path(__file__).parent / "results" / "model.json"


def train_images_per_s(spec, imgsz: int, batch: int, steps: int) -> float:
    """Median-step training throughput on random images with one target per image."""
    torch.manual_seed(0)
    model = build_model(spec).train().to(memory_format=torch.channels_last)
    loss_fn = ComputeLoss(model, LossParams(), imgsz)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.rand(batch, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[i, i % spec.detect.nc, 0.5, 0.5, 0.3, 0.1] for i in range(batch)])
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = loss_fn(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    median = sorted(times[1:])[len(times[1:]) // 2]
    return batch / median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    params = load_params(args.params)
    spec = yolov5_spec(params.model.base, nc=2, names=("barcode", "qrcode"),
                       width_multiple=params.model.width_multiple, depth_multiple=params.model.depth_multiple)
    sizes = args.sizes or [params.train.imgsz, 640]
    rows = []
    for imgsz in sizes:
        ev = EvalParams(latency_runs=50, latency_warmup=10, threads=params.eval.threads, imgsz_sweep=[imgsz])
        cost = profile(build_model(spec).eval(), imgsz, ev)
        rows.append({
            "imgsz": imgsz,
            "train_images_per_s": round(train_images_per_s(spec, imgsz, args.batch, args.steps), 2),
            "batch": args.batch,
            **{k: cost[k] for k in ("gflops", "params", "latency_quick_ms", "latency_torch_quick_ms", "threads")},
        })
        print(rows[-1])
    write_json_atomic(args.out, {
        "model": spec.name,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "results": rows,
    })


if __name__ == "__main__":
    main()
