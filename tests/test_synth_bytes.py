"""The synthetic dataset is the same bytes on any machine: CPU features, threads and workers
change nothing, and a golden hash of a 20-image dataset catches drift."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sha256 over (path, sha256 of the file) of every file of the 20-image dataset below, with the
# locked versions (requirements/*.lock). If this changes, the synthetic data changed: the demo's
# dvc.lock, baseline and every result after it change with it.
GOLDEN = "677eb9f55270de105bed33d5805d6af57a3a45fd8f763c5537337a6c3d980b77"
SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from slimloop.config import DataParams, SyntheticParams
from slimloop.data.synth import generate_dataset
out, workers = Path(sys.argv[1]), int(sys.argv[2])
params = DataParams(seed=0, synthetic=SyntheticParams(image_size=160, train=14, val=4, test=2, max_codes=4,
    min_size=0.15, max_size=0.6, distractors=1, backgrounds_dir=None))  # every knob named: defaults may move
generate_dataset(out, params, progress=False, workers=workers)
files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob('*')) if p.is_file()}
print(hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest())
"""
# Other code paths of the same machine: OpenCV without AVX-512, AVX2 or AVX (an older CPU),
# NumPy without AVX-512 and AVX2, one thread, and two worker processes.
CPU_AVX2 = "AVX512F,AVX512-SKX,AVX512-CLX,AVX512-ICL,AVX_VNNI"
CPU_SSE = CPU_AVX2 + ",AVX2,FMA3,FP16,AVX"
VARIANTS = {
    "default": ({}, 0),
    "opencv_avx2": ({"OPENCV_CPU_DISABLE": CPU_AVX2}, 0),
    "opencv_sse4_numpy_x86v2": ({"OPENCV_CPU_DISABLE": CPU_SSE,
                                 "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"}, 0),
    "one_thread_two_workers": ({"OMP_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1"}, 2),
}


def render_hash(tmp_path: Path, env: dict[str, str], workers: int) -> str:
    out = tmp_path / f"data-{len(list(tmp_path.iterdir()))}"
    full = {**os.environ, **env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(workers)], env=full,
                          capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1]


def test_same_bytes_on_every_code_path(tmp_path):
    hashes = {name: render_hash(tmp_path, env, workers) for name, (env, workers) in VARIANTS.items()}
    assert len(set(hashes.values())) == 1, hashes


def test_golden_hash(tmp_path):
    assert render_hash(tmp_path, {}, 0) == GOLDEN
