"""Step sparse_train: network slimming's L1 penalty on BN gammas, its schedule and |gamma| histograms."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from slimloop.checkpoint import load_model
from slimloop.compress.steps import StepResult, measure_step, step_meta
from slimloop.config import EvalParams, SparseParams, TrainParams
from slimloop.distributed import is_main_process
from slimloop.io import load_json_text, write_json_atomic
from slimloop.model import conv_modules
from slimloop.train import TrainHooks, train


def regularize_gammas(model: nn.Module, lam: float, skip: set[str] | None = None) -> float:
    """Network slimming: add ``lam * sign(gamma)`` to every prunable BN gamma's gradient.

    Call after backward (and after unscaling under AMP). Returns the L1 norm of the gammas.
    """
    total = 0.0
    for name, conv in conv_modules(model).items():
        if skip and name in skip:
            continue
        gamma = conv.bn.weight
        if gamma.grad is not None:
            gamma.grad.add_(torch.sign(gamma.detach()), alpha=lam)
        total += float(gamma.detach().abs().sum())
    return total


def sparse_lambda(sparse: SparseParams, progress: float) -> float:
    """``lam`` at ``progress`` in [0, 1): constant; decaying linearly or by cosine to
    ``low_fraction * lam`` at the end; or ``rising`` linearly from ``low_fraction * lam`` to ``lam``."""
    x = min(max(progress, 0.0), 1.0)
    if sparse.schedule == "linear":
        factor = 1 - x
    elif sparse.schedule == "cosine":
        factor = (1 + math.cos(math.pi * x)) / 2
    elif sparse.schedule == "rising":
        factor = x
    else:
        return sparse.lam
    return sparse.lam * (sparse.low_fraction + (1 - sparse.low_fraction) * factor)


def fraction_below(model: nn.Module, threshold: float) -> float:
    """Fraction of all prunable BN |gamma| below ``threshold``."""
    return float((gamma_values(model) < threshold).float().mean())


class SparsityControl:
    """The penalty's strength during one run: the schedule, times a scale that grows by
    ``sparse.lam_growth`` after every epoch that ends with fewer than ``sparse.target_fraction`` of
    the |gamma| below ``sparse.target_threshold`` (practical slimming: raise lam until enough
    channels are switched off). Without a target the scale stays 1. ``rows`` log each epoch."""

    def __init__(self, sparse: SparseParams):
        self.sparse, self.scale, self.rows = sparse, 1.0, []

    def lam(self, progress: float) -> float:
        """The strength at ``progress`` in [0, 1)."""
        return sparse_lambda(self.sparse, progress) * self.scale

    def __call__(self, epoch: int, model: nn.Module, metrics: dict[str, float]) -> None:
        s = self.sparse
        below = fraction_below(model, s.target_threshold)
        self.rows.append({"epoch": epoch + 1, "scale": self.scale, "below": round(below, 6)})
        if s.target_fraction is not None and below < s.target_fraction:
            self.scale *= s.lam_growth


def gamma_values(model: nn.Module) -> Tensor:
    """All prunable BN |gamma| of ``model`` as one flat tensor."""
    return torch.cat([c.bn.weight.detach().abs().flatten().cpu() for c in conv_modules(model).values()])


class GammaHistogram:
    """``on_epoch_end`` callback: histogram counts of all |gamma| per epoch, as JSON-able rows.

    The bin edges are fixed at creation (0 to the largest |gamma| then) so epochs compare; larger
    values fall in the last bin. Row 0 is the model before training. With ``path``, rows are saved
    every epoch and read back (same edges only), so a resumed run keeps the epochs it skips.
    """

    def __init__(self, max_gamma: float, bins: int = 40, path: Path | None = None):
        self.edges = [round(float(e), 6) for e in torch.linspace(0.0, max(max_gamma, 1e-6), bins + 1)]
        self.path, self.rows = path, []
        if path is not None and Path(path).exists():
            with contextlib.suppress(ValueError, TypeError, OSError):  # damaged: the epochs are recorded anew
                rows = load_json_text(Path(path).read_text(encoding="utf-8"))
                self.rows = [r for r in rows if isinstance(r, dict) and r.get("edges") == self.edges
                             and isinstance(r.get("epoch"), int) and isinstance(r.get("counts"), list)]

    @classmethod
    def from_model(cls, model: nn.Module, bins: int = 40, path: Path | None = None) -> GammaHistogram:
        """Edges from ``model``'s gammas, and its histogram as epoch 0."""
        hist = cls(float(gamma_values(model).max()), bins, path)
        hist.record(0, model)
        return hist

    def record(self, epoch: int, model: nn.Module) -> None:
        """Store (or replace) the histogram of ``model``'s |gamma| labelled ``epoch``."""
        values = gamma_values(model)
        counts = torch.histogram(values.clamp_max(self.edges[-1]), torch.tensor(self.edges)).hist  # (bins,)
        row = {"epoch": epoch, "edges": self.edges, "counts": [int(c) for c in counts],
               "mean_abs": round(float(values.mean()), 6)}
        self.rows = sorted([r for r in self.rows if r["epoch"] != epoch] + [row], key=lambda r: r["epoch"])
        if self.path is not None and is_main_process():  # under DDP rank 0 alone writes
            write_json_atomic(self.path, self.rows)

    def __call__(self, epoch: int, model: nn.Module, metrics: dict[str, float]) -> None:
        self.record(epoch + 1, model)


def sparse_hooks(sparse: SparseParams, histogram: GammaHistogram | None = None,
                 control: SparsityControl | None = None) -> TrainHooks:
    """Hooks that add ``lam(progress) * sign(gamma)`` to every BN gamma's gradient (and log it);
    ``control`` (made here when None) sets the strength and adapts it after each epoch."""
    control = control or SparsityControl(sparse)

    def after_backward(model: nn.Module, progress: float) -> dict[str, float]:
        lam = control.lam(progress)
        return {"gamma_l1": regularize_gammas(model, lam), "lam": lam}

    return TrainHooks(after_backward=after_backward, on_epoch_end=[control] + ([histogram] if histogram else []))


def sparse_train_step(ckpt: Path, data_root, sparse: SparseParams, train_params: TrainParams,
                      eval_params: EvalParams, out_dir: Path, imgsz: int | None = None,
                      progress: bool = False) -> StepResult:
    """Train ``ckpt`` with the L1 penalty on BN gammas for ``sparse.epochs``.

    Writes ``out_dir/train/`` (the run), ``gamma_hist.json`` and ``gamma_hist.png``. The output
    is the run's last checkpoint (the sparsest), not its best. No warm-up: the model is trained
    already, and the warm-up's bias lr of 0.1 would jolt it.

    Returns:
        The record has ``gamma_below_threshold`` (fraction of |gamma| below
        ``sparse.target_threshold`` at the end) and ``lam_scale`` (the final strength factor);
        ``extra``: ``histogram`` (the JSON rows), ``history`` (per-epoch training rows) and
        ``control`` (per-epoch scale and fraction below the threshold).
    """
    out_dir, model = Path(out_dir), load_model(ckpt)
    histogram = GammaHistogram.from_model(model, path=out_dir / "gamma_hist.json")
    params = train_params.model_copy(
        update={"epochs": sparse.epochs, "lr0": sparse.lr0 or train_params.lr0, "warmup_epochs": 0.0})
    control = SparsityControl(sparse)
    result = train(model, data_root, params, eval_params, out_dir / "train",
                   hooks=sparse_hooks(sparse, histogram, control), progress=progress,
                   meta=step_meta("sparse", ckpt, sparse=sparse))
    histogram.rows = [r for r in histogram.rows if r["epoch"] <= sparse.epochs]  # a longer old run's
    write_json_atomic(out_dir / "gamma_hist.json", histogram.rows)
    from slimloop.report.plots import draw_gamma_histograms

    draw_gamma_histograms(histogram.rows, out_dir / "gamma_hist.png")
    last = load_model(result.last)
    below = round(fraction_below(last, sparse.target_threshold), 6)
    record = measure_step(last, data_root, imgsz or params.imgsz, eval_params, "sparse", params.device,
                          epochs=sparse.epochs, gamma_below_threshold=below, lam_scale=control.scale)
    return StepResult(result.last, record, {"histogram": histogram.rows, "history": result.history,
                                            "control": control.rows})
