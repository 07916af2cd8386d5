"""Autoanchor as in YOLOv5: best possible recall, k-means plus genetic refinement of anchors."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from slimloop.errors import DataError
from slimloop.model.spec import ModelSpec

BPR_OK = 0.98  # YOLOv5 refits only below this best possible recall


def _as_wh(wh: np.ndarray | torch.Tensor) -> np.ndarray:
    wh = wh.detach().cpu().numpy() if isinstance(wh, torch.Tensor) else np.asarray(wh)
    wh = wh.astype(np.float64).reshape(-1, 2)
    if len(wh) == 0:
        raise DataError("no boxes in the training labels: cannot check or fit anchors")
    return wh


def _best_ratio(anchors: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """For each box, the best over anchors of min(w ratio, h ratio, 1/ratios): ``(N,)`` in (0, 1]."""
    k = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)  # (K, 2)
    r = wh[:, None] / k[None]  # (N, K, 2)
    x = np.minimum(r, 1 / r).min(2)  # (N, K) worst side per anchor
    return x.max(1)


def anchor_fitness(anchors: np.ndarray, wh: np.ndarray | torch.Tensor, thr: float = 4.0) -> float:
    """YOLOv5's anchor fitness: mean best ratio metric of the boxes that any anchor can match.

    Args:
        anchors: ``(..., 2)`` anchor (w, h) in pixels.
        wh: ``(N, 2)`` box (w, h) in pixels at the training size.
        thr: the loss's ``anchor_t`` (a box matches an anchor if both sides are within thr x).
    """
    best = _best_ratio(anchors, _as_wh(wh))
    return float((best * (best > 1 / thr)).mean())


def best_possible_recall(anchors: np.ndarray, wh: np.ndarray | torch.Tensor, thr: float = 4.0) -> float:
    """Fraction of boxes that at least one anchor can match under the ``anchor_t`` rule.

    Args:
        anchors: ``(nl, na, 2)`` (or ``(K, 2)``) anchor (w, h) in pixels.
        wh: ``(N, 2)`` box (w, h) in pixels at the training size.
        thr: the loss's ``anchor_t``.
    """
    return float((_best_ratio(anchors, _as_wh(wh)) > 1 / thr).mean())


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability ~ squared distance."""
    c = [x[rng.integers(len(x))]]
    d2 = ((x - c[0]) ** 2).sum(1)  # (N,)
    for _ in range(1, k):
        total = d2.sum()
        c.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
        d2 = np.minimum(d2, ((x - c[-1]) ** 2).sum(1))
    return np.stack(c)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds, best of ``restarts`` by mean distance (as scipy's)."""
    best, best_dist = x[:k], np.inf
    for _ in range(restarts):
        c = _kmeans_pp(x, k, rng)  # (k, 2)
        for _ in range(iters):
            assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)  # (N,)
            new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
            done = np.allclose(new, c, rtol=0, atol=1e-8)
            c = new
            if done:
                break
        dist = np.sqrt(((x[:, None] - c[None]) ** 2).sum(-1)).min(1).mean()
        if dist < best_dist:
            best, best_dist = c, dist
    return best


def _evolve(k: np.ndarray, wh: np.ndarray, thr: float, gen: int, rng: np.random.Generator) -> np.ndarray:
    """YOLOv5's genetic refinement: keep random multiplicative mutations that raise fitness."""
    f, mp, sigma = anchor_fitness(k, wh, thr), 0.9, 0.1
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # mutate until something changes
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * sigma + 1)
            v = v.clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = anchor_fitness(kg, wh, thr)
        if fg > f:
            f, k = fg, kg
    return k


def fit_anchors(
    wh: np.ndarray | torch.Tensor,
    n: int = 9,
    imgsz: int = 640,
    thr: float = 4.0,
    gen: int = 300,
    seed: int = 0,
    levels: int = 3,
) -> tuple[np.ndarray, float]:
    """Fit ``n`` anchors to box sizes: k-means on whitened (w, h), then genetic refinement.

    Args:
        wh: ``(N, 2)`` box (w, h) in pixels at the training size.
        n: number of anchors (``levels * na``).
        imgsz: training size; only scales the random start used when there are fewer than
            ``n`` boxes (YOLOv5's fallback).
        thr: the loss's ``anchor_t``.
        gen: generations of mutation.
        seed: makes the result deterministic.
        levels: detection levels; anchors are split evenly over them, smallest first.

    Returns:
        ``(anchors (levels, n / levels, 2) px sorted by area, best possible recall)``.
    """
    if n % levels:
        raise ValueError(f"n = {n} anchors do not split evenly over {levels} levels")
    wh0 = _as_wh(wh)
    fit = wh0[(wh0 >= 2.0).any(1)]  # YOLOv5 ignores boxes under 2 px on both sides
    fit = fit if len(fit) else wh0
    rng = np.random.default_rng(seed)
    if n <= len(np.unique(fit, axis=0)):
        s = fit.std(0)
        s = np.where(s > 0, s, 1.0)  # a constant side needs no whitening
        k = _kmeans(fit / s, n, rng) * s
    else:
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * imgsz
    k = _evolve(k, fit, thr, gen, rng)
    k = k[np.argsort(k.prod(1))]  # small to large, so P3 gets the smallest
    return k.reshape(levels, n // levels, 2), best_possible_recall(k, wh0, thr)


def check_anchors(
    spec: ModelSpec,
    wh: np.ndarray | torch.Tensor,
    thr: float = 4.0,
    imgsz: int = 640,
    gen: int = 300,
    seed: int = 0,
) -> tuple[ModelSpec, float, float]:
    """Refit the spec's anchors if their best possible recall is under 0.98 (YOLOv5's rule).

    The fitted anchors replace the old ones only if they recall more boxes.

    Args:
        spec: the model to check.
        wh: ``(N, 2)`` training box (w, h) in pixels at the training size.
        thr: the loss's ``anchor_t``.
        imgsz: training size (used only when there are fewer boxes than anchors).
        gen: generations of mutation when refitting.
        seed: makes the refit deterministic.

    Returns:
        ``(spec', bpr_before, bpr_after)``; ``spec'`` is ``spec`` itself when nothing changed.
    """
    old = np.asarray(spec.detect.anchors, dtype=np.float64)  # (nl, na, 2)
    before = best_possible_recall(old, wh, thr)
    if before >= BPR_OK:
        return spec, before, before
    nl, na = old.shape[:2]
    anchors, after = fit_anchors(wh, n=nl * na, imgsz=imgsz, thr=thr, gen=gen, seed=seed, levels=nl)
    if after <= before:
        return spec, before, before
    new = tuple(tuple((float(w), float(h)) for w, h in level) for level in anchors)
    detect = dataclasses.replace(spec.detect, anchors=new)
    return dataclasses.replace(spec, detect=detect), before, after
