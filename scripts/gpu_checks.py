"""CUDA checks after a gpu-smoke run (scripts/gpu_smoke.sh): AMP with the unscaled sparsity penalty,
CUDA latency, the ONNX Runtime GPU providers. Prints one JSON object; exits 1 when a check fails.

``python scripts/gpu_checks.py --params params.yaml --baseline models/baseline [--allow-cpu]``
(``--allow-cpu``: run what can run without a GPU, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from slimloop.checkpoint import load_model
from slimloop.compress.sparse import regularize_gammas
from slimloop.config import load_params
from slimloop.model import conv_modules
from slimloop.train import TrainHooks, train


def first_step_gamma_grad(ckpt: Path, params, amp: bool, out: Path) -> float:
    """Norm of the BN gamma gradients the after-backward hook sees at step 1 (before the penalty)."""
    seen: list[float] = []

    def after_backward(model, progress):
        grads = [c.bn.weight.grad for c in conv_modules(model).values() if c.bn.weight.grad is not None]
        if not seen:
            seen.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        return {"gamma_l1": regularize_gammas(model, 1e-4)}

    run = params.train.model_copy(update={"epochs": 1, "amp": amp, "lr0": 1e-6, "warmup_epochs": 0.0,
                                          "val_every": 100})
    train(load_model(ckpt), params.data.out_dir, run, params.eval, out, hooks=TrainHooks(after_backward=after_backward),
          resume=False, progress=False)
    return seen[0]


def check_amp(ckpt: Path, params, scratch: Path) -> dict:
    """Under AMP the hook must see unscaled gradients: the same magnitude as in fp32 (a scaled one is
    thousands of times larger: GradScaler starts at 65536)."""
    amp = first_step_gamma_grad(ckpt, params, True, scratch / "amp")
    fp32 = first_step_gamma_grad(ckpt, params, False, scratch / "fp32")
    ratio = amp / fp32 if fp32 else float("inf")
    return {"gamma_grad_amp": amp, "gamma_grad_fp32": fp32, "ratio": ratio, "ok": 0.5 <= ratio <= 2.0}


def check_latency(ckpt: Path, params) -> dict:
    from slimloop.profile import profile

    rec = profile(load_model(ckpt), params.train.imgsz, params.eval)
    return {"latency_cuda_quick_ms": rec.get("latency_cuda_quick_ms"), "latency_quick_ms": rec["latency_quick_ms"],
            "ok": torch.cuda.is_available() == ("latency_cuda_quick_ms" in rec)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--baseline", type=Path, default=Path("models/baseline"))
    parser.add_argument("--scratch", type=Path, default=Path("gpu_checks"))
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: nothing to check (--allow-cpu runs the script's CPU paths)", file=sys.stderr)
        return 1
    import onnxruntime as ort

    params = load_params(args.params)
    ckpt = args.baseline / "best.safetensors"
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "ort_providers": ort.get_available_providers(),
              "amp": check_amp(ckpt, params, args.scratch), "latency": check_latency(ckpt, params)}
    print(json.dumps(report, indent=2))
    return 0 if report["amp"]["ok"] and report["latency"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
