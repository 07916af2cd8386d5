"""Synthetic dataset generation speed (images/s) and peak memory, sequential and with the pool.

Generates ``--n`` training images (plus the one validation image the params require) at the
default size into a temporary folder, once per worker count, and times each run end to end
(rendering, JPEG encoding, writing, annotations, worker start-up).

    PYTHONPATH=src python benchmarks/bench_synth.py --n 1000 --out benchmarks/results/synth.json
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from slimloop.config import DataParams, SyntheticParams
from slimloop.data.stats import dataset_stats
from slimloop.data.synth import generate_dataset
from slimloop.io import write_json_atomic


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child process."""
    divisor = 2**20 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes there, KiB here
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / divisor
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / divisor
    return {"self_mb": round(own, 1), "children_mb": round(children, 1)}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(n: int, image_size: int, workers: int, seed: int) -> dict:
    """Generate ``n`` + 1 images with ``workers`` processes; time and summarise the result."""
    data = DataParams(
        seed=seed, synthetic=SyntheticParams(image_size=image_size, train=n, val=1, test=0)
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        splits = generate_dataset(tmp / "ds", data, progress=False, workers=workers)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        images = sum(len(s.samples) for s in splits.values())
        disk = sum(p.stat().st_size for p in (tmp / "ds").rglob("*") if p.is_file())
        stats = dataset_stats(tmp / "ds")["splits"]["train"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_image = [len(s.boxes) for s in splits["train"].samples]
    return {
        "workers": workers,
        "images": images,
        "seconds": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 1),
        "cpu_seconds": round(cpu, 3),  # this process and its workers, user + system
        "images_per_cpu_s": round(images / cpu, 1),  # what one free core would do
        "mean_codes_per_image": round(float(np.mean(per_image)), 3),
        "images_without_codes": stats["images_without_boxes"],
        "boxes_per_class": {k: v["boxes"] for k, v in stats["per_class"].items()},
        "box_side_px": stats["box_size"]["px"]["side"],
        "disk_mb": round(disk / 2**20, 2),
        "peak_rss_after": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="training images to generate")
    parser.add_argument("--size", type=int, default=SyntheticParams().image_size)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synth.json")
    args = parser.parse_args()
    runs = []
    for workers in args.workers:
        runs.append(run(args.n, args.size, workers, args.seed))
        last = runs[-1]
        print(f"workers={workers}: {last['images_per_s']} images/s wall, "
              f"{last['images_per_cpu_s']} images per CPU-second, peak RSS {last['peak_rss_after']}")
    result = {
        "benchmark": "synthetic dataset generation",
        "command": f"python benchmarks/bench_synth.py --n {args.n}",
        "image_size": args.size,
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
