"""BatchNorm statistics over every rank's batch on CPU (gloo), where torch's SyncBatchNorm is CUDA-only."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_DIMS = (0, 2, 3)  # reduce over batch and space: one statistic per channel


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)  # (1, C, 1, 1)


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch statistics from all-reduced sums; the backward all-reduces the two sums it needs."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        # x: (B, C, H, W) this rank's share of the batch
        c = x.shape[1]
        sums = torch.cat([x.sum(_DIMS, dtype=torch.float64), (x.double() ** 2).sum(_DIMS),
                          torch.tensor([x.numel() // c], dtype=torch.float64)])  # (2C + 1,)
        dist.all_reduce(sums)
        n = sums[-1]
        mean = sums[:c] / n  # (C,)
        var = (sums[c : 2 * c] / n - mean**2).clamp_min(0)  # (C,) biased, as BN normalizes
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * n / (n - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        invstd = torch.rsqrt(var + eps).to(x.dtype)  # (C,)
        xhat = (x - _view(mean.to(x.dtype))) * _view(invstd)  # (B, C, H, W)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count = float(n)
        return xhat * _view(weight) + _view(bias)

    @staticmethod
    def backward(ctx, grad):
        xhat, invstd, weight = ctx.saved_tensors
        c = xhat.shape[1]
        local = torch.cat([grad.sum(_DIMS), (grad * xhat).sum(_DIMS)])  # (2C,) this rank's sums
        grad_bias, grad_weight = local[:c].clone(), local[c:].clone()  # DDP averages them like any grad
        dist.all_reduce(local)
        mean_g, mean_gx = _view(local[:c] / ctx.count), _view(local[c:] / ctx.count)
        grad_x = _view(weight * invstd) * (grad - mean_g - xhat * mean_gx)  # (B, C, H, W)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every rank's batch (one all-reduce forward,
    one backward); in eval mode, or without a process group, it is plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      self.eps, self.momentum)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d synchronized across ranks: torch's SyncBatchNorm on CUDA,
    :class:`CpuSyncBatchNorm2d` (same parameters and buffers, same state dict) elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats and m.momentum is not None:
            m.__class__ = CpuSyncBatchNorm2d  # a subclass with no state of its own: weights stay shared
    return model
