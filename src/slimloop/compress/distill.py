"""Step distill: knowledge distillation from an unpruned teacher, detection outputs (KL / L2) and
neck features, with feature adapters initialized from the keep masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimloop.checkpoint import load_model
from slimloop.compress.groups import topology
from slimloop.compress.steps import Lineage, StepResult, load_masks, measure_step, step_meta
from slimloop.config import DistillParams, EvalParams, TrainParams
from slimloop.distributed import all_sum, world_size
from slimloop.train import TrainHooks, train


@dataclass(frozen=True)
class DistillWeights:
    """Weights of each distillation term (0 turns a term off)."""

    obj: float = 1.0
    cls: float = 1.0
    kl: float = 1.0
    box: float = 1.0
    feature: float = 1.0
    temperature: float = 2.0
    box_conf: float = 0.5  # teacher objectness above which box outputs are matched (L2)


def binary_kl(student_logits: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(teacher || student) of Bernoulli outputs: BCE minus the teacher's entropy.

    Zero exactly when the student's probabilities equal the teacher's.
    """
    bce = F.binary_cross_entropy_with_logits(student_logits, teacher_prob, reduction="none")
    t = teacher_prob.clamp(1e-7, 1 - 1e-7)
    entropy = -(t * t.log() + (1 - t) * (1 - t).log())
    return (bce - entropy).clamp_min(0)


def _norms(t_objs: list[torch.Tensor], confident: list[torch.Tensor], bs: int,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[list[float], list[float]]:
    """Per level, what the class/KL sums (teacher objectness) and the box sum (confident outputs)
    divide by: this batch's totals, or under DDP the global ones times this rank's batch share (so
    that the ranks' terms, each times its batch size, add up to the single-process term)."""
    local = torch.stack([*(o.sum() for o in t_objs), *(c.sum() for c in confident)]).double()  # (2L,)
    if reduce is None:
        out = local
    else:
        both = reduce(torch.cat([local, local.new_tensor([bs])]))  # (2L + 1,) summed over the ranks
        out = both[:-1] * bs / both[-1]
    n = len(t_objs)
    return out[:n].clamp_min(1.0).tolist(), out[n:].tolist()


def output_distill_loss(
    student_raw: list[torch.Tensor], teacher_raw: list[torch.Tensor], w: DistillWeights,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Distillation terms on the raw Detect maps of two models with the same head layout.

    Args:
        student_raw: per level ``(B, na, H, W, 5 + nc)`` logits of the student.
        teacher_raw: the same for the teacher (no grad needed).
        w: term weights.
        reduce: under DDP a sum over the ranks (``slimloop.distributed.all_sum``): the normalizers
            become global, as ``ComputeLoss.reduce`` does for the detection loss.

    Returns:
        ``{"kd_obj", "kd_cls", "kd_kl", "kd_box"}``, each a scalar already weighted.
    """
    dev = student_raw[0].device
    terms = {k: torch.zeros((), device=dev) for k in ("kd_obj", "kd_cls", "kd_kl", "kd_box")}
    t_objs = [t.detach().float()[..., 4].sigmoid() for t in teacher_raw]  # (B, na, H, W) per level
    confident = [o > w.box_conf for o in t_objs]
    obj_norms, box_counts = _norms(t_objs, confident, student_raw[0].shape[0], reduce)
    for s, t, t_obj, conf, norm, count in zip(student_raw, teacher_raw, t_objs, confident, obj_norms, box_counts,
                                              strict=True):
        s, t = s.float(), t.detach().float()
        terms["kd_obj"] = terms["kd_obj"] + binary_kl(s[..., 4], t_obj).mean()
        nc = s.shape[-1] - 5
        weight = t_obj.unsqueeze(-1)  # weight class terms by how sure the teacher is of an object
        cls_kl = binary_kl(s[..., 5:], t[..., 5:].sigmoid()) * weight
        terms["kd_cls"] = terms["kd_cls"] + cls_kl.sum() / (norm * nc)
        if nc > 1:
            temp = w.temperature
            log_p = F.log_softmax(s[..., 5:] / temp, dim=-1)
            q = F.softmax(t[..., 5:] / temp, dim=-1)
            kl = (q * (q.clamp_min(1e-9).log() - log_p)).sum(-1) * t_obj * temp**2
            terms["kd_kl"] = terms["kd_kl"] + kl.sum() / norm
        if conf.any():
            diff = s[..., :4].sigmoid()[conf] - t[..., :4].sigmoid()[conf]  # (K, 4)
            terms["kd_box"] = terms["kd_box"] + diff.pow(2).sum(-1).sum() / count
    return {
        "kd_obj": terms["kd_obj"] * w.obj,
        "kd_cls": terms["kd_cls"] * w.cls,
        "kd_kl": terms["kd_kl"] * w.kl,
        "kd_box": terms["kd_box"] * w.box,
    }


class FeatureAdapters(nn.Module):
    """1x1 convs mapping student neck widths to teacher widths (widths differ after pruning).

    Initialized so that student channel ``j`` copies into teacher channel ``channel_maps[i][j]``
    (a pruned student's surviving channels land where they came from, so a student pruned from
    the teacher starts at zero feature loss when the pruned channels were zero). Without maps,
    the identity on the first ``min(student, teacher)`` channels.
    """

    def __init__(
        self,
        student_chs: list[int],
        teacher_chs: list[int],
        channel_maps: list[torch.Tensor] | None = None,
    ):
        super().__init__()
        self.adapters = nn.ModuleList()
        for i, (s_ch, t_ch) in enumerate(zip(student_chs, teacher_chs, strict=True)):
            conv = nn.Conv2d(s_ch, t_ch, 1, bias=False)
            with torch.no_grad():
                conv.weight.zero_()  # (t_ch, s_ch, 1, 1)
                if channel_maps is None:
                    n = min(s_ch, t_ch)
                    conv.weight[:n, :n, 0, 0] = torch.eye(n)
                else:
                    index = torch.as_tensor(channel_maps[i], dtype=torch.long)  # (s_ch,) teacher channels
                    if index.numel() != s_ch or (s_ch and int(index.max()) >= t_ch):
                        raise ValueError(f"channel map {i} does not map {s_ch} to {t_ch} channels")
                    conv.weight[index, torch.arange(s_ch), 0, 0] = 1.0
            self.adapters.append(conv)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [a(f) for a, f in zip(self.adapters, feats, strict=True)]


def feature_distill_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], adapters: FeatureAdapters
) -> torch.Tensor:
    """Mean L2 between adapted student features and teacher features over P3..P5."""
    adapted = adapters(student_feats)
    losses = [F.mse_loss(a.float(), t.detach().float()) for a, t in zip(adapted, teacher_feats, strict=True)]
    return torch.stack(losses).mean()


class DistillLoss:
    """A ``TrainHooks.extra_loss``: output and feature distillation from a frozen teacher.

    The teacher runs in eval mode under no_grad (moved to the batch's device on first use). The
    weighted terms are summed and multiplied by the batch size, as ComputeLoss scales the detection
    loss; each term is returned for logging (``kd_obj``, ``kd_cls``, ``kd_kl``, ``kd_box``,
    ``kd_feat``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, weights: DistillWeights,
                 channel_maps: list[torch.Tensor] | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weights = weights
        self.adapters = None
        if weights.feature > 0:
            self.adapters = FeatureAdapters([m.in_channels for m in student.detect.m],
                                            [m.in_channels for m in teacher.detect.m], channel_maps)

    def modules(self) -> list[nn.Module]:
        """The modules to train with the student (the feature adapters)."""
        return [self.adapters] if self.adapters is not None else []

    def terms(self, imgs: torch.Tensor, feats: list[torch.Tensor], raw: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted terms for a batch ``imgs`` (B, 3, H, W), the student's ``feats`` P3..P5 and ``raw`` maps."""
        if next(self.teacher.parameters()).device != imgs.device:
            self.teacher.to(imgs.device)
        with torch.no_grad():
            t_feats, t_raw = self.teacher.forward_features(imgs)
        # under DDP (every rank runs the teacher on its share) the normalizers are global
        terms = output_distill_loss(raw, t_raw, self.weights, reduce=all_sum if world_size() > 1 else None)
        if self.adapters is not None:
            terms["kd_feat"] = feature_distill_loss(feats, t_feats, self.adapters) * self.weights.feature
        return terms

    def __call__(self, imgs: torch.Tensor, feats: list[torch.Tensor], raw: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.terms(imgs, feats, raw)
        total = torch.stack(list(terms.values())).sum() * imgs.shape[0]
        return total, {k: float(v.detach()) for k, v in terms.items()}


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


def kd_items(history: list[dict[str, float]]) -> dict[str, float]:
    """The last epoch's ``kd_*`` distillation terms, without the ``train/`` prefix."""
    return {k.removeprefix("train/"): v for k, v in history[-1].items() if k.startswith("train/kd_")}


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
    meta = step_meta("distill", ckpt, teacher, distill=distill)
    result = train(model, data_root, params, eval_params, Path(out_dir) / "train", hooks=hooks,
                   progress=progress, meta=meta)
    kd = kd_items(result.history)
    record = measure_step(load_model(result.best), data_root, imgsz or params.imgsz, eval_params, "distill",
                          params.device, epochs=distill.epochs, distill_terms=kd)
    return StepResult(result.best, record, {"history": result.history})

