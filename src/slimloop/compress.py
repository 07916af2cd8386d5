"""The steps of one compression iteration, each from input checkpoint(s) to a checkpoint and a record."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from slimloop.checkpoint import file_sha256, load_checkpoint, load_model, save_checkpoint
from slimloop.config import (
    DistillParams,
    EvalParams,
    PadParams,
    PruneParams,
    RetrainParams,
    SparseParams,
    TrainParams,
    params_to_dict,
)
from slimloop.distill import DistillLoss, DistillWeights
from slimloop.errors import CheckpointError
from slimloop.io import write_bytes_atomic, write_json_atomic
from slimloop.model import build_model, conv_modules
from slimloop.prune import (
    gamma_scores,
    kept_fraction,
    pad_channels,
    prune_model,
    recalibrate_bn,
    regularize_gammas,
    select_channels,
    topology,
)
from slimloop.train import TrainHooks, seed_everything, select_device, train

REWIND_NAME = "rewind.safetensors"
PROBE = 64  # probe image for constant folding: a pruned channel is constant everywhere, any size works


@dataclass(frozen=True)
class StepResult:
    """A step's output checkpoint, its evaluation record, and JSON-able extras (paths as str)."""

    checkpoint: Path
    record: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    """A reference checkpoint and the keep-mask files (oldest first) that lead from its spec to a
    descendant's: the baseline's early weights for rewinding, or a teacher for distillation."""

    checkpoint: Path
    masks: tuple[Path, ...] = ()


def _measure(model: nn.Module, data_root, imgsz: int, eval_params: EvalParams, step: str,
             device: str = "auto", **fields: Any) -> dict[str, Any]:
    from slimloop.measure import measure_model

    device = "cpu" if select_device(device).type == "mps" else str(select_device(device))
    record = measure_model(model.to(device), data_root, "val", imgsz, eval_params, device=device)
    return {"step": step, **record, **fields}


def evaluate_step(ckpt: Path, data_root, eval_params: EvalParams, imgsz: int, step: str = "evaluate") -> StepResult:
    """Evaluate and profile a checkpoint as it is (writes nothing)."""
    return StepResult(Path(ckpt), _measure(load_model(ckpt), data_root, imgsz, eval_params, step))


def sparse_lambda(sparse: SparseParams, progress: float) -> float:
    """``lam`` at ``progress`` in [0, 1): constant, or decaying linearly / by cosine to
    ``final_fraction * lam`` at the end of the run."""
    x = min(max(progress, 0.0), 1.0)
    if sparse.schedule == "linear":
        factor = 1 - x
    elif sparse.schedule == "cosine":
        factor = (1 + math.cos(math.pi * x)) / 2
    else:
        return sparse.lam
    return sparse.lam * (sparse.final_fraction + (1 - sparse.final_fraction) * factor)


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
            with contextlib.suppress(ValueError, OSError):
                self.rows = [r for r in json.loads(Path(path).read_text()) if r.get("edges") == self.edges]

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
        if self.path is not None:
            write_json_atomic(self.path, self.rows)

    def __call__(self, epoch: int, model: nn.Module, metrics: dict[str, float]) -> None:
        self.record(epoch + 1, model)


def sparse_hooks(sparse: SparseParams, histogram: GammaHistogram | None = None) -> TrainHooks:
    """Hooks that add ``lam(progress) * sign(gamma)`` to every BN gamma's gradient (and log it)."""

    def after_backward(model: nn.Module, progress: float) -> dict[str, float]:
        lam = sparse_lambda(sparse, progress)
        return {"gamma_l1": regularize_gammas(model, lam), "lam": lam}

    return TrainHooks(after_backward=after_backward, on_epoch_end=[histogram] if histogram else [])


def sparse_train_step(ckpt: Path, data_root, sparse: SparseParams, train_params: TrainParams,
                      eval_params: EvalParams, out_dir: Path, imgsz: int | None = None,
                      progress: bool = False) -> StepResult:
    """Train ``ckpt`` with the L1 penalty on BN gammas for ``sparse.epochs``.

    Writes ``out_dir/train/`` (the run), ``gamma_hist.json`` and ``gamma_hist.png``. The output
    is the run's last checkpoint (the sparsest), not its best. No warm-up: the model is trained
    already, and the warm-up's bias lr of 0.1 would jolt it.

    Returns:
        ``extra``: ``histogram`` (the JSON rows) and ``history`` (per-epoch training rows).
    """
    out_dir, model = Path(out_dir), load_model(ckpt)
    histogram = GammaHistogram.from_model(model, path=out_dir / "gamma_hist.json")
    params = train_params.model_copy(
        update={"epochs": sparse.epochs, "lr0": sparse.lr0 or train_params.lr0, "warmup_epochs": 0.0})
    result = train(model, data_root, params, eval_params, out_dir / "train", hooks=sparse_hooks(sparse, histogram),
                   progress=progress, meta=_meta("sparse", ckpt, sparse=sparse))
    histogram.rows = [r for r in histogram.rows if r["epoch"] <= sparse.epochs]  # a longer old run's
    write_json_atomic(out_dir / "gamma_hist.json", histogram.rows)
    from slimloop.report_plots import draw_gamma_histograms

    draw_gamma_histograms(histogram.rows, out_dir / "gamma_hist.png")
    record = _measure(load_model(result.last), data_root, imgsz or params.imgsz, eval_params, "sparse",
                      params.device, epochs=sparse.epochs)
    return StepResult(result.last, record, {"histogram": histogram.rows, "history": result.history})


def save_masks(path: Path, keep: dict[str, Tensor], scores: dict[str, Tensor]) -> Path:
    """Write keep masks and gamma scores per channel group as one safetensors file, atomically."""
    tensors = {**{f"keep/{g}": m.to(torch.uint8).contiguous() for g, m in keep.items()},
               **{f"score/{g}": s.float().contiguous() for g, s in scores.items()}}
    write_bytes_atomic(path, save(tensors, metadata={"format": "slimloop/masks-1"}))
    return Path(path)


def load_masks(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Read ``(keep, scores)`` written by :func:`save_masks`.

    Raises:
        CheckpointError: missing or unreadable file.
    """
    try:
        tensors = load(Path(path).read_bytes())
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot read masks file {path}: {exc}") from None
    keep = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("keep/")}
    scores = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")}
    return keep, scores


def _check_masks(model: nn.Module, keep: dict[str, Tensor], source: Path) -> None:
    expected = {g: grp.width for g, grp in topology(model.spec).groups.items()}
    if {g: int(m.numel()) for g, m in keep.items()} != expected:
        raise CheckpointError(f"{source}: masks do not fit the channel groups of {model.spec.name}")


def apply_masks(model: nn.Module, mask_files: tuple[Path, ...] | list[Path]) -> nn.Module:
    """Prune ``model`` with each file's keep masks in turn (the masks of iterations 1..k)."""
    for path in mask_files:
        keep, _ = load_masks(path)
        _check_masks(model, keep, Path(path))
        model = prune_model(model, keep, probe=PROBE)
    return model


def _surgery_step(model: nn.Module, ckpt: Path, keep: dict[str, Tensor], scores: dict[str, Tensor], step: str,
                  params: Any, data_root, eval_params: EvalParams, out_dir: Path, imgsz: int,
                  recalibrate: int) -> StepResult:
    out_dir = Path(out_dir)
    device = select_device()
    device = torch.device("cpu") if device.type == "mps" else device  # mps: on the CPU, like the surgery
    out = recalibrate_bn(prune_model(model, keep, probe=PROBE).to(device), data_root, imgsz, recalibrate).cpu()
    path = save_checkpoint(out_dir / f"{step}.safetensors", out,
                           {"step": step, "parent": file_sha256(ckpt), step: params_to_dict(params),
                            "recalibrated_images": recalibrate})
    masks = save_masks(out_dir / "masks.safetensors", keep, scores)
    fraction = kept_fraction(model.spec, out.spec)
    record = _measure(out, data_root, imgsz, eval_params, step, kept_fraction=round(fraction, 6),
                      recalibrated_images=recalibrate)
    return StepResult(path, record, {"masks": str(masks), "kept_fraction": fraction})


def prune_step(ckpt: Path, data_root, prune: PruneParams, eval_params: EvalParams, out_dir: Path,
               imgsz: int) -> StepResult:
    """Select channels by global |gamma| (``prune.ratio`` or ``prune.threshold``), cut them, and
    re-estimate the BN statistics on ``prune.recalibrate`` training images.

    Writes ``out_dir/prune.safetensors`` and ``out_dir/masks.safetensors`` (keep masks and scores
    relative to ``ckpt``'s channel groups, for :func:`pad_step` and rewinding).
    """
    model = load_model(ckpt)
    scores = gamma_scores(model, topology(model.spec))
    keep = select_channels(scores, prune.ratio, prune.threshold, prune.min_channels)
    return _surgery_step(model, ckpt, keep, scores, "prune", prune, data_root, eval_params, out_dir, imgsz,
                         prune.recalibrate)


def pad_step(ckpt: Path, masks: Path, data_root, pad: PadParams, eval_params: EvalParams, out_dir: Path,
             imgsz: int, recalibrate: int = 0) -> StepResult:
    """Round the pruned widths up to ``pad.multiple`` (restoring the largest-gamma channels) and cut.

    Args:
        ckpt: the model the masks were selected on (the sparse-trained one, not the pruned one).
        masks: ``masks.safetensors`` of :func:`prune_step`.
        recalibrate: training images that re-estimate the BN statistics (``prune.recalibrate``).

    Writes ``out_dir/pad.safetensors`` and ``out_dir/masks.safetensors`` (the padded masks).
    """
    keep, scores = load_masks(masks)
    model = load_model(ckpt)
    _check_masks(model, keep, Path(masks))
    padded = pad_channels(keep, scores, pad.multiple)
    return _surgery_step(model, ckpt, padded, scores, "pad", pad, data_root, eval_params, out_dir, imgsz,
                         recalibrate)


def channel_maps(reference: nn.Module, mask_files: tuple[Path, ...] | list[Path]) -> list[Tensor]:
    """Per Detect level, the reference model's channel index of each of the descendant's channels."""
    maps: list[Tensor] = []
    keeps = [load_masks(p)[0] for p in mask_files]
    topo = topology(reference.spec)
    for k, conv in enumerate(reference.detect.m):
        index = torch.arange(conv.in_channels)  # (C_ref,)
        for keep in keeps:
            index = index[torch.cat([keep[g] for g in topo.inputs[f"detect.m.{k}"]])]
        maps.append(index)
    return maps


def distill_hooks(student: nn.Module, distill: DistillParams, teacher: Lineage) -> TrainHooks:
    """Hooks that add the distillation loss from ``teacher`` (adapters initialized from its masks)."""
    teacher_model = load_model(teacher.checkpoint)
    maps = channel_maps(teacher_model, teacher.masks) if teacher.masks else None
    weights = DistillWeights(**distill.model_dump(include={"obj", "cls", "kl", "box", "feature", "temperature"}))
    loss = DistillLoss(teacher_model, student, weights, maps)
    return TrainHooks(extra_loss=loss, extra_modules=loss.modules())


def _kd_items(history: list[dict[str, float]]) -> dict[str, float]:
    return {k.removeprefix("train/"): v for k, v in history[-1].items() if k.startswith("train/kd_")}


def _meta(step: str, ckpt: Path, teacher: Lineage | None = None, **params: Any) -> dict[str, Any]:
    meta = {"step": step, "parent": file_sha256(ckpt), **{k: params_to_dict(v) for k, v in params.items()}}
    if teacher is not None:
        meta["teacher"] = file_sha256(teacher.checkpoint)
    return meta


def distill_step(ckpt: Path, teacher: Lineage, data_root, distill: DistillParams, train_params: TrainParams,
                 eval_params: EvalParams, out_dir: Path, imgsz: int | None = None, lr0: float | None = None,
                 progress: bool = False) -> StepResult:
    """Finetune ``ckpt`` for ``distill.epochs`` with the distillation loss added to the detection loss.

    Args:
        teacher: the teacher checkpoint and the mask files from its spec to the student's (they
            initialize the feature adapters so that surviving channels map to where they came from).
        lr0: the finetune learning rate (default ``train_params.lr0``).

    Returns:
        The best checkpoint of ``out_dir/train``; the record carries the last epoch's ``kd_*`` terms.
    """
    model = load_model(ckpt)
    hooks = distill_hooks(model, distill, teacher)
    params = train_params.model_copy(update={"epochs": distill.epochs, "lr0": lr0 or train_params.lr0})
    meta = _meta("distill", ckpt, teacher, distill=distill)
    result = train(model, data_root, params, eval_params, Path(out_dir) / "train", hooks=hooks,
                   progress=progress, meta=meta)
    kd = _kd_items(result.history)
    record = _measure(load_model(result.best), data_root, imgsz or params.imgsz, eval_params, "distill",
                      params.device, epochs=distill.epochs, distill_terms=kd)
    return StepResult(result.best, record, {"history": result.history})


def scratch_epochs(epochs: int, base_gflops: float, pruned_gflops: float, cap: float) -> int:
    """Scratch-B budget: ``epochs * base / pruned`` (same compute as the unpruned run), at most
    ``cap * epochs``, never fewer than ``epochs``."""
    scaled = round(epochs * base_gflops / max(pruned_gflops, 1e-12))
    return max(epochs, min(scaled, math.floor(epochs * cap)))


def _start_model(ckpt: Path, retrain: RetrainParams, train_params: TrainParams, imgsz: int,
                 base_gflops: float | None, rewind: Lineage | None) -> tuple[nn.Module, TrainParams]:
    """The model retraining starts from, and the training params for it."""
    from slimloop.profile import gflops

    target = load_checkpoint(ckpt).spec
    if retrain.mode == "finetune":
        warmup = train_params.warmup_epochs if retrain.warmup_epochs is None else retrain.warmup_epochs
        return load_model(ckpt), train_params.model_copy(
            update={"epochs": retrain.epochs, "lr0": retrain.lr0 or train_params.lr0, "warmup_epochs": warmup})
    if retrain.mode == "scratch":
        seed_everything(train_params.seed)
        model = build_model(target)
        epochs = retrain.epochs
        if retrain.scratch_budget:
            if base_gflops is None:
                raise ValueError("retrain.scratch_budget needs the baseline GFLOPs")
            epochs = scratch_epochs(retrain.epochs, base_gflops, gflops(model, imgsz),
                                    retrain.budget_cap)
        return model, train_params.model_copy(update={"epochs": epochs})
    if rewind is None:
        raise ValueError("retrain.mode rewind needs the rewind checkpoint and the masks")
    model = apply_masks(load_model(rewind.checkpoint), rewind.masks)
    if model.spec != target:
        raise CheckpointError(f"{rewind.checkpoint}: the rewound model's spec differs from {ckpt}'s "
                              "(masks from another lineage?)")
    return model, train_params.model_copy(update={"epochs": retrain.epochs})


def retrain_step(ckpt: Path, data_root, retrain: RetrainParams, train_params: TrainParams,
                 eval_params: EvalParams, out_dir: Path, *, imgsz: int | None = None,
                 base_gflops: float | None = None, rewind: Lineage | None = None,
                 distill: DistillParams | None = None, teacher: Lineage | None = None,
                 progress: bool = False) -> StepResult:
    """Retrain the pruned (padded) structure of ``ckpt``: finetune its weights, train it from scratch
    (optionally with the scratch-B budget), or rewind to the baseline's early weights.

    Args:
        imgsz: evaluation size (default ``train_params.imgsz``).
        base_gflops: the unpruned model's GFLOPs at ``imgsz`` (scratch-B budget).
        rewind: the baseline's ``rewind.safetensors`` and the mask files of iterations 1..k.
        distill: with ``teacher``, distill jointly while retraining.

    Returns:
        The best checkpoint of ``out_dir/train``; the record has the epochs actually trained.
    """
    imgsz = imgsz or train_params.imgsz
    model, params = _start_model(ckpt, retrain, train_params, imgsz, base_gflops, rewind)
    hooks, kd = None, {}
    if distill is not None and teacher is not None:
        hooks = distill_hooks(model, distill, teacher)
    meta = _meta("retrain", ckpt, teacher if hooks else None, retrain=retrain,
                 **({"distill": distill} if hooks else {}))
    if rewind is not None and retrain.mode == "rewind":
        meta["rewind"] = file_sha256(rewind.checkpoint)
    result = train(model, data_root, params, eval_params, Path(out_dir) / "train", hooks=hooks,
                   progress=progress, meta=meta)
    if hooks:
        kd = {"distill_terms": _kd_items(result.history)}
    record = _measure(load_model(result.best), data_root, imgsz, eval_params, "retrain",
                      params.device, epochs=params.epochs, mode=retrain.mode,
                      distill="joint" if hooks else "off", **kd)
    return StepResult(result.best, record, {"history": result.history})

