"""Where does the time go? ONNX Runtime's own per-node profile of the baseline and the final model,
grouped by network layer and by operator, to see which part of the latency shrinks with the
channels and which does not (the decode, per-call overhead).

    python benchmarks/bench_profile.py [--run-dir .] [--models baseline final] [--runs 300]

Runs in a project folder after `dvc repro` (models/compressed/onnx/ and its index). The sessions
are built with the latency table's own options (slimloop.deploy.runtimes.ort_session_options:
threads, sequential execution, denormals as zero); the profile is taken over ``--runs`` calls
after a warm-up, the two models alternating in blocks. Writes benchmarks/results/profile.json
and prints the table. Profiling adds a little time per node: read the shares, not the absolute ms.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def layer_of(node: str) -> str:
    """The network row a node belongs to, from torch.onnx's scope names (``/model.4/cv1/conv/Conv``
    -> ``4``, ``/detect/m.0/Conv`` -> ``detect``, the rest of ``/detect/`` -> ``decode``); the layout
    reorders ONNX Runtime inserts -> ``reorder``; anything else -> ``other``."""
    if node.startswith(("ReorderInput", "ReorderOutput")):  # NCHWc layout changes ONNX Runtime inserts
        return "reorder"
    parts = node.strip("/").split("/")
    if not parts or not parts[0]:
        return "other"
    head = parts[0]
    if head == "detect":
        return "detect" if len(parts) > 1 and parts[1].startswith("m.") else "decode"
    match = re.fullmatch(r"(?:model|layers|net)?\.?(\d+)", head)
    return match.group(1) if match else "other"


def profiled_session(path: Path, threads: int, warmup: int, folder: Path) -> list:
    """A profiling ONNX Runtime session of ``path``, warmed up; ``[session, input name, input]``."""
    import onnxruntime as ort

    from slimloop.deploy.runtimes import ort_session_options

    opts = ort_session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / path.stem)
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    return [sess, inp.name, x]


def summarize(profile_file: Path, warmup: int) -> dict:
    events = json.loads(profile_file.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs = runs[warmup:]
    start = runs[0]["ts"] if runs else 0
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    n = max(len(runs), 1)
    by_layer: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in nodes:
        name = e["name"][: -len("_kernel_time")]
        by_layer[layer_of(name)] += e["dur"] / 1000 / n
        by_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1000 / n
    run_ms = statistics.median(r["dur"] / 1000 for r in runs) if runs else None
    kernels = sum(by_layer.values())
    return {"runs": len(runs), "run_ms_median": round(run_ms, 4) if run_ms else None,
            "kernel_ms_per_run": round(kernels, 4),
            "outside_kernels_ms": round(run_ms - kernels, 4) if run_ms else None,
            "by_layer_ms": {k: round(v, 4) for k, v in sorted(by_layer.items(), key=_row_order)},
            "by_op_ms": {k: round(v, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def _row_order(kv: tuple[str, float]) -> tuple[int, str]:
    key = kv[0]
    return (int(key), "") if key.isdigit() else (10_000, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT, help="a project folder after dvc repro")
    parser.add_argument("--models", nargs="+", default=["baseline", "final"])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=6, help="the models alternate in this many blocks")
    parser.add_argument("--threads", type=int, default=None, help="default: the latency table's")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile.json")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "src")]
    from slimloop.deploy.runtimes import default_threads
    from slimloop.io import write_json_atomic
    from slimloop.provenance import environment

    index = json.loads((args.run_dir / "models" / "compressed" / "onnx" / "index.json").read_text())
    files = {m: args.run_dir / "models" / "compressed" / "onnx" / index["models"][m]["file"] for m in args.models}
    threads = args.threads or default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {m: profiled_session(p, threads, args.warmup, Path(tmp)) for m, p in files.items()}
        per_block = max(args.runs // args.blocks, 1)
        for _ in range(args.blocks):  # interleaved, as the latency table is
            for sess, name, x in sessions.values():
                for _ in range(per_block):
                    sess.run(None, {name: x})
        results = {m: summarize(Path(s[0].end_profiling()), args.warmup) for m, s in sessions.items()}
    base = results[args.models[0]]
    for r in results.values():
        r["ratio_vs_first"] = {k: round(base["by_layer_ms"].get(k, 0) / v, 3)
                               for k, v in r["by_layer_ms"].items() if v > 0}
    write_json_atomic(args.out, {"models": {m: str(p) for m, p in files.items()}, "threads": threads,
                                 "results": results, "env": environment()})
    names = list(results)
    layers = list(dict.fromkeys(k for r in results.values() for k in r["by_layer_ms"]))
    print("layer".ljust(10) + "".join(f"{n:>14}" for n in names) + "   share of " + names[-1])
    last = results[names[-1]]
    for k in layers:
        cells = "".join(f"{results[n]['by_layer_ms'].get(k, 0):14.4f}" for n in names)
        print(k.ljust(10) + cells + f"   {100 * last['by_layer_ms'].get(k, 0) / last['run_ms_median']:5.1f}%")
    for key in ("kernel_ms_per_run", "outside_kernels_ms", "run_ms_median"):
        print(key.ljust(10) + "".join(f"{results[n][key]:14.4f}" for n in names))


if __name__ == "__main__":
    main()
