"""A training run for tests/test_ddp.py to start under torchrun: the tiny spec, the given params.

Ranks other than 0 record every write they make under the run folder (Python's audit hooks see
``open`` for writing, renames, removals, mkdir) and save the list to ``--audit`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

from slimloop.compress.distill import DistillLoss, DistillWeights
from slimloop.compress.sparse import sparse_hooks
from slimloop.config import EvalParams, SparseParams, TrainParams
from slimloop.distributed import init_distributed, is_main_process, rank, shutdown_distributed
from slimloop.model import build_model, yolov5_spec
from slimloop.train import TrainHooks, seed_everything, train

WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.move")


def tiny_spec():
    """conftest's ``tiny_spec``."""
    return yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.125, depth_multiple=0.33)


def distiller(student):
    """A distillation loss from a teacher of another init with random BN statistics, and its
    adapters (identity at first). Its box term takes outputs the teacher is 0.02 sure of: about
    half of P5's, a different number in each image (so per-rank and global means differ)."""
    from conftest import randomize_bn

    seed_everything(1)
    loss = DistillLoss(randomize_bn(build_model(tiny_spec())), student, DistillWeights(box_conf=0.02))
    return loss, loss.modules()


def audit_writes(root: Path) -> list[str]:
    """Start recording writes under ``root``; returns the list that fills up."""
    seen: list[str] = []
    prefix = str(root.resolve())

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(prefix)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1] or "", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and under(args[0]):
                seen.append(f"open {args[0]}")
        elif event in WRITE_EVENTS and args and under(args[0]):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", required=True, help="TrainParams as JSON")
    parser.add_argument("--eval", required=True, help="EvalParams as JSON")
    parser.add_argument("--lam", type=float, default=0.0, help="L1 on BN gammas (constant)")
    parser.add_argument("--kill-at", type=float, default=None, help="rank 1 SIGKILLs itself at this progress")
    parser.add_argument("--audit", type=Path, default=None)
    parser.add_argument("--distill", action="store_true", help="distil from a teacher of another init")
    parser.add_argument("--snapshot", type=Path, default=None, help="rank 0 saves the weights after epoch 1 here")
    args = parser.parse_args()
    params = TrainParams.model_validate_json(args.train)
    init_distributed("cpu")
    seen = audit_writes(args.out) if not is_main_process() else []
    hooks = sparse_hooks(SparseParams(epochs=params.epochs, lam=args.lam)) if args.lam else TrainHooks()
    if args.kill_at is not None and rank() == 1:
        inner = hooks.after_backward

        def kill(model, progress):
            if progress >= args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(model, progress) if inner else None

        hooks.after_backward = kill
    if args.snapshot is not None and is_main_process():
        hooks.on_epoch_end.append(lambda epoch, model, row: epoch or save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(args.snapshot)))
    seed_everything(params.seed)
    model = build_model(tiny_spec())
    if args.distill:
        hooks.extra_loss, hooks.extra_modules = distiller(model)
    result = train(model, args.data, params, EvalParams.model_validate_json(args.eval),
                   args.out, hooks=hooks, progress=False)
    if args.audit is not None and not is_main_process():
        args.audit.write_text(json.dumps({"writes": seen, "history": result.history}))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
