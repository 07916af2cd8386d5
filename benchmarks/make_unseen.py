"""A YOLO-format dataset unlike the embedded one, for robustness runs: photo-like textured
backgrounds, more and smaller codes, other counts and seed (python benchmarks/make_unseen.py OUT).

It is generated (nothing downloads) and then exported in the ultralytics layout, so the pipeline
imports it through ``data.source: yolo`` as it would a user's own data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from slimloop.config import DataParams, SyntheticParams
from slimloop.data import raster
from slimloop.data.synth import generate_dataset
from slimloop.data.yolo import export_yolo


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A photo-like background: 1/f value noise in a random palette, soft edges of 'objects',
    a lighting gradient and grain; (size, size, 3) uint8 BGR."""
    field = np.zeros((size, size), np.float32)
    for octave in range(1, 6):
        cells = 2 ** octave + 1
        low = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
        field += raster.resize(low, (size, size), "cubic") / octave
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    palette = rng.uniform(0, 255, (2, 3)).astype(np.float32)  # two colours the noise blends
    img = palette[0] + field[..., None] * (palette[1] - palette[0])
    for _ in range(int(rng.integers(2, 7))):  # boxes and shelves: flat regions with soft edges
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        shade = rng.uniform(0.5, 1.4)
        img[y0 : y0 + h, x0 : x0 + w] *= np.float32(shade)
    img = raster.gaussian_blur(img.astype(np.float32), float(rng.uniform(0.8, 2.5)))
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.arange(size, dtype=np.float32) / size
    light = 0.7 + 0.5 * (math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None]) / 2
    img = img * light[..., None] + rng.standard_normal((size, size, 1), dtype=np.float32) * 6
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_textures(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` textures as JPEG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"texture_{i:03d}.jpg"), texture(rng, size), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def make_unseen(out: Path, train: int = 400, val: int = 150, seed: int = 7, image_size: int = 160) -> Path:
    """Generate the dataset under ``out`` and return its ``data.yaml``."""
    textures = write_textures(out / "textures", 48, 2 * image_size, seed)
    synthetic = SyntheticParams(image_size=image_size, train=train, val=val, test=0, max_codes=6,
                                min_size=0.08, max_size=0.35, distractors=3, backgrounds_dir=str(textures))
    canonical = out / "canonical"
    generate_dataset(canonical, DataParams(seed=seed, synthetic=synthetic), progress=True)
    return export_yolo(canonical, out / "yolo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder to write (textures/, canonical/, yolo/data.yaml)")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(make_unseen(args.out, args.train, args.val, args.seed))


if __name__ == "__main__":
    main()
