"""Data-loader throughput (images/s) with full augmentation, and image-cache memory.

Generates its own dataset (random coloured rectangles, 256 px) in a temporary folder, then for
each image size and worker count iterates a persistent-worker loader for a few epochs.

    PYTHONPATH=src python benchmarks/bench_loader.py [--images 200] [--epochs 3]

Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from slimloop.config import AugmentParams
from slimloop.data.canonical import Sample, Split, image_dir, write_annotations
from slimloop.data.dataset import DetectionDataset, make_loader
from slimloop.io import write_json_atomic

RESULTS = Path(__file__).parent / "results" / "loader.json"


def make_dataset(root: Path, n: int, size: int = 256, seed: int = 0) -> None:
    """``n`` PNG images with 0-4 random filled rectangles each, plus train.json."""
    rng = np.random.default_rng(seed)
    folder = image_dir(root, "train")
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for k in range(n):
        img = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8) + rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        boxes = []
        for _ in range(rng.integers(0, 5)):
            w, h = rng.integers(8, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            cv2.rectangle(img, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), rng.integers(0, 256, 3).tolist(), -1)
            boxes.append([x, y, x + w, y + h])
        cv2.imwrite(str(folder / f"{k:05d}.png"), img)
        arr = np.array(boxes, np.float64).reshape(-1, 4)
        samples.append(Sample(f"{k:05d}.png", size, size, arr, np.zeros(len(arr), np.int64)))
    write_annotations(root, "train", Split(["box"], samples))


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(ds: DetectionDataset, workers: int, epochs: int, batch_size: int) -> dict:
    """Throughput of one loader: epoch 0 warms up (worker start), epochs 1..epochs are timed."""
    loader = make_loader(ds, batch_size=batch_size, shuffle=True, workers=workers, seed=0, epoch=0)
    t0 = time.perf_counter()
    first = None
    for _ in loader:
        first = first or time.perf_counter() - t0
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = 0
    for epoch in range(1, epochs + 1):
        ds.set_epoch(epoch)
        for imgs, _, _ in loader:
            count += imgs.shape[0]
    elapsed = time.perf_counter() - t0
    del loader  # stops the persistent workers
    return {
        "workers": workers,
        "images_per_s": round(count / elapsed, 1),
        "images": count,
        "first_batch_s": round(first, 3),
        "warmup_epoch_s": round(warm_s, 3),
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 640])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), args.images)
        for size in args.sizes:
            rss0, t0 = rss_bytes(), time.perf_counter()
            ds = DetectionDataset(tmp, "train", size, augment=AugmentParams(mosaic=1.0))
            cache = {
                "cache_mb": round(ds.cache_bytes / 2**20, 1),
                "rss_growth_mb": round((rss_bytes() - rss0) / 2**20, 1),
                "cache_build_s": round(time.perf_counter() - t0, 3),
            }
            for workers in args.workers:
                row = {"imgsz": size, **measure(ds, workers, args.epochs, args.batch_size), **cache}
                runs.append(row)
                print(row, flush=True)
            del ds
    result = {
        "what": "DetectionDataset + make_loader throughput, AugmentParams defaults (mosaic 1.0)",
        "dataset": {"images": args.images, "image_size": 256},
        "batch_size": args.batch_size,
        "machine": machine(),
        "runs": runs,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
