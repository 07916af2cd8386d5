"""The compression loop (plan D): iterate sparse-train, prune, pad, retrain, distill; stop or roll back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slimloop.checkpoint import load_checkpoint
from slimloop.compress.decide import (
    REASONS,
    Decision,
    accepted,
    map_drop,
    retention,
    size_targets,
    smaller_step,
    target_reached,
)
from slimloop.compress.distill import distill_step
from slimloop.compress.land import SizeTarget, spec_cost
from slimloop.compress.pad import pad_step
from slimloop.compress.prune import prune_step
from slimloop.compress.retrain import REWIND_NAME, retrain_step
from slimloop.compress.sparse import sparse_train_step
from slimloop.compress.steps import Lineage, StepResult, evaluate_step
from slimloop.compress.surgery import kept_fraction
from slimloop.config import Params
from slimloop.errors import ConfigError
from slimloop.model import conv_widths

StepFn = Callable[..., StepResult]
RunStep = Callable[[str, StepFn, dict[str, Any]], StepResult]


def call_step(name: str, fn: StepFn, kwargs: dict[str, Any]) -> StepResult:
    """The default ``run_step``: call the step directly."""
    return fn(**kwargs)


# ---- the loop ----------------------------------------------------------------------------------


__all__ = ["REASONS", "Decision", "LoopResult", "run_loop"]


@dataclass
class LoopResult:
    """Every iteration's dict, the decision, and the final model (the baseline when ``best == 0``)."""

    iterations: list[dict[str, Any]]
    decision: Decision
    baseline: dict[str, Any]
    final_checkpoint: Path
    final_record: dict[str, Any]
    loop_record: dict[str, Any] | None = None  # the final iteration's record before the final retraining
    final_retrain: dict[str, Any] | None = None  # {"mode", "epochs"} when compress.final_retrain ran
    tolerance: float = 0.01  # compress.tolerance: the final model's largest allowed drop

    @property
    def epochs_to_final(self) -> int:
        """Epochs trained along the final model's lineage: iterations 1..best and the final retraining."""
        again = self.final_retrain["epochs"] if self.final_retrain else 0
        return sum(it["epochs"] for it in self.iterations[: self.decision.best]) + again

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (``metrics/final.json``): which iteration is final and why it stopped.

        ``record`` is the final model's; ``loop_record`` the final iteration's before the final
        retraining (the same record when there was none). ``epochs_to_final`` (the control's budget
        beyond the baseline's) and ``epochs_total`` include the final retraining.
        """
        return {"final_iteration": self.decision.best, "reason": self.decision.reason,
                "accepted": list(self.decision.accepted), "iterations_run": len(self.iterations),
                "checkpoint": str(self.final_checkpoint), "epochs_to_final": self.epochs_to_final,
                "epochs_total": sum(it.get("epochs_spent", it["epochs"]) for it in self.iterations)
                + (self.final_retrain["epochs"] if self.final_retrain else 0),
                "map_drop": round(map_drop(self.final_record, self.baseline), 6),
                "tolerance": self.tolerance,
                "tolerance_met": map_drop(self.final_record, self.baseline) <= self.tolerance + 1e-9,
                "first_attempts": self.iterations[0].get("attempts", []) if self.iterations else [],
                "final_retrain": self.final_retrain, "loop_record": self.loop_record or self.final_record,
                "record": self.final_record, "baseline": self.baseline}


@dataclass(frozen=True)
class _Context:
    params: Params
    data_root: Path
    work_dir: Path
    imgsz: int
    run_step: RunStep
    baseline_ckpt: Path
    baseline: dict[str, Any]
    rewind_ckpt: Path | None
    progress: bool
    land: SizeTarget | None = None


def _retrain_kwargs(ctx: _Context, out: Path, ckpt: Path, masks: list[Path], teacher: Lineage) -> dict[str, Any]:
    p = ctx.params
    kwargs: dict[str, Any] = dict(
        ckpt=ckpt, data_root=ctx.data_root, retrain=p.retrain, train_params=p.train, eval_params=p.eval,
        out_dir=out / "retrain", imgsz=ctx.imgsz, progress=ctx.progress)
    if p.retrain.mode == "scratch" and p.retrain.scratch_budget:
        kwargs["base_gflops"] = ctx.baseline["gflops"]
    if p.retrain.mode == "rewind":
        kwargs["rewind"] = Lineage(ctx.rewind_ckpt, tuple(masks))
    if p.distill.mode == "joint":
        kwargs.update(distill=p.distill, teacher=teacher)
    return kwargs


def _auto_pad_kwargs(p: Params) -> dict[str, Any]:
    """``pad.multiple: auto`` measures: the latency params and the machine enter the pad step's key."""
    if p.pad.multiple != "auto":
        return {}
    from slimloop.deploy.latency import machine_fingerprint

    return {"latency": p.latency, "machine": machine_fingerprint(p.latency)}


def _sparse(ctx: _Context, k: int, current: Path) -> StepResult:
    p = ctx.params
    return ctx.run_step("sparse_train", sparse_train_step, dict(
        ckpt=current, sparse=p.sparse, train_params=p.train, out_dir=ctx.work_dir / f"iter_{k}" / "sparse",
        progress=ctx.progress, data_root=ctx.data_root, eval_params=p.eval, imgsz=ctx.imgsz))


def _attempt(ctx: _Context, out: Path, current: Path, sparse: StepResult, ratio: float,
             masks: list[Path], reach: float | None = None) -> tuple[dict[str, Any], Path, Path]:
    """Cut ``ratio`` of ``sparse``'s channels (more, up to ``reach``, when that is what meets the size
    targets), pad, finetune (and distill) into ``out``.

    Returns the steps' records and widths, the final checkpoint, and this cut's mask file.
    """
    p, run = ctx.params, ctx.run_step
    common = dict(data_root=ctx.data_root, eval_params=p.eval, imgsz=ctx.imgsz)
    pruned = run("prune", prune_step, dict(
        ckpt=sparse.checkpoint, prune=p.prune, ratio=ratio, land=ctx.land, seed=p.train.seed,
        out_dir=out / "prune", **({"reach": reach} if reach is not None else {}), **common))
    padded = run("pad", pad_step, dict(
        ckpt=sparse.checkpoint, masks=Path(pruned.extra["masks"]), pad=p.pad, recalibrate=p.prune.recalibrate,
        out_dir=out / "pad", **_auto_pad_kwargs(p), **common))
    lineage = [*masks, Path(padded.extra["masks"])]
    teacher = (Lineage(ctx.baseline_ckpt, tuple(lineage)) if p.distill.teacher == "baseline"
               else Lineage(current, (lineage[-1],)))
    retrained = run("retrain", retrain_step, _retrain_kwargs(ctx, out, padded.checkpoint, lineage, teacher))
    final, distilled, epochs = retrained, None, retrained.record["epochs"]
    if p.distill.mode == "separate":
        distilled = run("distill", distill_step, dict(
            ckpt=retrained.checkpoint, teacher=teacher, distill=p.distill, train_params=p.train,
            out_dir=out / "distill", lr0=p.retrain.lr0, progress=ctx.progress, **common))
        final, epochs = distilled, epochs + p.distill.epochs
    widths = {name: conv_widths(load_checkpoint(ckpt).spec)
              for name, ckpt in (("before", sparse.checkpoint), ("pruned", pruned.checkpoint),
                                 ("padded", padded.checkpoint))}
    results = {"sparse": sparse, "pruned": pruned, "padded": padded, "retrained": retrained, "distilled": distilled}
    steps = {name: r.record if r else None for name, r in results.items()}
    spec = load_checkpoint(final.checkpoint).spec
    return {"steps": steps, "final_step": "distilled" if distilled else "retrained", "spec": spec.to_dict(),
            "checkpoint": str(final.checkpoint), "widths": widths, "epochs": epochs,
            "checkpoints": {name: str(r.checkpoint) for name, r in results.items() if r},
            "kept_fraction": round(kept_fraction(load_checkpoint(ctx.baseline_ckpt).spec, spec), 6),
            "ratio": pruned.record.get("ratio", ratio), "landed": bool(pruned.record.get("landed"))}, \
        final.checkpoint, Path(padded.extra["masks"])


def _iteration(ctx: _Context, k: int, current: Path, parent: dict[str, Any],
               masks: list[Path]) -> tuple[dict[str, Any], Path | None, Path | None]:
    """Iteration ``k`` from ``current``: sparse training once, then cuts of ``compress.step_ratio``,
    halved after each one whose finetuned model keeps less than ``compress.min_retention`` of
    ``parent``'s mAP, until one is accepted or the step would fall below ``compress.min_step_ratio``.

    Returns the iteration's dict (the accepted attempt's steps, or the last rejected one's, and
    every attempt under ``attempts``), its checkpoint and its mask file (both None when rejected).
    """
    p = ctx.params
    sparse = _sparse(ctx, k, current)
    ratio: float | None = p.compress.step_ratio
    # The last allowed iteration may cut more than a step (up to compress.reach) when that is what
    # meets the size targets; rejected, it falls back to the step and its halvings.
    reach = p.compress.reach if k == p.compress.iterations and ctx.land is not None else None
    attempts: list[dict[str, Any]] = []
    while ratio is not None:
        out = ctx.work_dir / f"iter_{k}" / (f"try_{len(attempts) + 1}" if attempts else "")
        it, ckpt, mask = _attempt(ctx, out, current, sparse, ratio, masks, reach)
        record = it["steps"][it["final_step"]]
        ok = accepted(record, parent, p.compress)
        reached = reach is not None and it["ratio"] > ratio + 1e-9
        attempts.append({"ratio": it["ratio"], "landed": it["landed"], "reached": reached, "map": record["map"],
                         "gflops": record["gflops"], "retention": round(retention(record, parent), 6),
                         "epochs": it["epochs"], "accepted": ok})
        if ok:
            break
        reach = None
        if not reached:
            ratio = smaller_step(ratio, p.compress)
    it.update(iteration=k, attempts=attempts, accepted=attempts[-1]["accepted"],
              epochs=p.sparse.epochs + it["epochs"],
              epochs_spent=p.sparse.epochs + sum(a["epochs"] for a in attempts),
              gamma_histogram=sparse.extra.get("histogram", []),
              sparse_control=sparse.extra.get("control", []))
    return (it, ckpt, mask) if it["accepted"] else (it, None, None)


def _final_retrain(ctx: _Context, best: int, ckpt: Path,
                   masks: list[Path]) -> tuple[StepResult, dict[str, Any]] | None:
    """Train the final model once more (``compress.final_retrain``): its weights further, or its
    structure from random weights (plan C: the pruned, padded widths as a found architecture), for
    ``compress.final_epochs`` (default ``train.epochs``) at ``compress.final_lr0`` (default
    ``train.lr0``) on a cosine schedule; finetuning skips the warm-up. None when off."""
    p = ctx.params
    mode = p.compress.final_retrain
    if mode == "off" or best == 0:
        return None
    epochs, lr0 = p.compress.final_epochs or p.train.epochs, p.compress.final_lr0 or p.train.lr0
    retrain = p.retrain.model_copy(
        update={"mode": mode, "epochs": epochs, "lr0": lr0, "warmup_epochs": 0, "scratch_budget": False})
    kwargs: dict[str, Any] = dict(
        ckpt=ckpt, data_root=ctx.data_root, retrain=retrain, train_params=p.train.model_copy(update={"lr0": lr0}),
        eval_params=p.eval, out_dir=ctx.work_dir / "final_retrain", imgsz=ctx.imgsz, progress=ctx.progress)
    if p.compress.final_distill:
        kwargs.update(distill=p.distill, teacher=Lineage(ctx.baseline_ckpt, tuple(masks[:best])))
    return ctx.run_step("final_retrain", retrain_step, kwargs), {"mode": mode, "epochs": epochs, "lr0": lr0}


def _reference(ctx: _Context, record: dict[str, Any]) -> dict[str, Any]:
    """The baseline record at the loop's evaluation size (measured again if it was taken at another)."""
    if record.get("imgsz") == ctx.imgsz:
        return record
    kwargs = dict(ckpt=ctx.baseline_ckpt, data_root=ctx.data_root, eval_params=ctx.params.eval,
                  imgsz=ctx.imgsz, step="baseline")
    return ctx.run_step("evaluate_baseline", evaluate_step, kwargs).record


def _rewind_checkpoint(params: Params, baseline_ckpt: Path, rewind_ckpt: Path | None) -> Path | None:
    if params.retrain.mode != "rewind":
        return None
    path = Path(rewind_ckpt) if rewind_ckpt else Path(baseline_ckpt).parent / REWIND_NAME
    if not path.exists():
        raise ConfigError(
            f"retrain.mode is rewind but {path} does not exist: the baseline must be trained with the "
            f"rewind callback (retrain.rewind_epoch = {params.retrain.rewind_epoch}) and at least that many epochs")
    return path


def _land_target(ctx: _Context) -> SizeTarget | None:
    """The size targets as absolute ceilings for the prune step (None when landing is off)."""
    p = ctx.params
    if not (p.compress.land and size_targets(p.target)):
        return None
    gflops, params = spec_cost(load_checkpoint(ctx.baseline_ckpt).spec)  # at PROBE_PX
    t, multiple, room = p.target, p.pad.multiple, 1.0
    if multiple == "auto":  # the multiple is measured later: land unpadded, leaving padding its allowed growth
        multiple, room = 1, 1.0 + p.pad.max_growth
    return SizeTarget(None if t.gflops_ratio is None else t.gflops_ratio * gflops / room,
                      None if t.params_ratio is None else int(t.params_ratio * params / room), multiple)


def _run_iterations(ctx: _Context) -> tuple[list[dict[str, Any]], list[Path], list[Path], Decision]:
    """Iterate until a target is met, no step is accepted, or ``compress.iterations`` are accepted."""
    p = ctx.params
    iterations: list[dict[str, Any]] = []
    checkpoints, masks, parent = [ctx.baseline_ckpt], [], ctx.baseline
    reason = "max_iterations"
    while len(checkpoints) <= p.compress.iterations:
        k = len(iterations) + 1
        it, ckpt, mask = _iteration(ctx, k, checkpoints[-1], parent, masks)
        iterations.append(it)
        if ckpt is None:
            reason = "cannot_compress" if len(checkpoints) == 1 else "step_floor"
            break
        checkpoints.append(ckpt)
        masks.append(mask)
        parent = it["steps"][it["final_step"]]
        if target_reached(parent, ctx.baseline, p.target):
            reason = "target_reached"
            break
    accepted_its = tuple(it["iteration"] for it in iterations if it["accepted"])
    for it in iterations:
        it["map_drop"] = round(map_drop(it["steps"][it["final_step"]], ctx.baseline), 6)
    return iterations, checkpoints, masks, Decision(reason, accepted_its[-1] if accepted_its else 0, accepted_its)


def run_loop(baseline_ckpt: Path, baseline_record: dict[str, Any], params: Params, data_root: Path,
             work_dir: Path, run_step: RunStep | None = None, rewind_ckpt: Path | None = None,
             progress: bool = False) -> LoopResult:
    """Compress the baseline iteratively, then (``compress.final_retrain``) train the final
    iteration's model once more (its record is the iteration's ``final_retrain`` step and the final record).

    Each iteration sparse-trains the current model once, then cuts ``compress.step_ratio`` of its
    channels (or, with ``compress.land``, just enough to meet the size targets when that is less;
    on the last allowed iteration, when that is more, up to ``compress.reach``), pads and finetunes; a cut whose finetuned model keeps less than ``compress.min_retention`` of
    its parent's mAP is retried with half the step, down to ``compress.min_step_ratio``. The loop
    stops when the targets are met (``target_reached``), after ``compress.iterations`` accepted
    iterations, or when no step is accepted (``step_floor``; ``cannot_compress`` at iteration 1,
    when the baseline itself is the result).

    Args:
        baseline_ckpt: the trained baseline (iteration 0).
        baseline_record: its metrics; measured again when taken at another size than the loop's.
        params: all sections (reads train, eval, sparse, prune, pad, retrain, distill, compress, target).
        data_root: canonical dataset folder.
        work_dir: steps write under ``work_dir/iter_<k>[/try_<j>]/<step>`` (unless ``run_step`` moves it).
        run_step: ``run_step(name, fn, kwargs) -> StepResult`` runs each step (``sparse_train``,
            ``prune``, ``pad``, ``retrain``, ``distill``, ``evaluate_baseline``, ``final_retrain``);
            the default calls ``fn(**kwargs)``. It may replace ``kwargs["out_dir"]``.
        rewind_ckpt: the baseline's early checkpoint (default ``rewind.safetensors`` beside it).
        progress: progress bars during training.

    Raises:
        ConfigError: ``retrain.mode`` is rewind and there is no rewind checkpoint.
    """
    ctx = _Context(params, Path(data_root), Path(work_dir), params.compress.imgsz or params.train.imgsz,
                   run_step or call_step, Path(baseline_ckpt), {},
                   _rewind_checkpoint(params, baseline_ckpt, rewind_ckpt), progress)
    ctx = replace(ctx, baseline=_reference(ctx, baseline_record))
    ctx = replace(ctx, land=_land_target(ctx))
    iterations, checkpoints, masks, decision = _run_iterations(ctx)
    best = decision.best
    final_record = ctx.baseline if best == 0 else iterations[best - 1]["steps"][iterations[best - 1]["final_step"]]
    result = LoopResult(iterations, decision, ctx.baseline, checkpoints[best], final_record,
                        tolerance=params.compress.tolerance)
    retrained = _final_retrain(ctx, best, checkpoints[best], masks)
    if retrained is not None:
        step, info = retrained
        iterations[best - 1]["steps"]["final_retrain"] = step.record
        iterations[best - 1].setdefault("checkpoints", {})["final_retrain"] = str(step.checkpoint)
        result = replace(result, final_checkpoint=step.checkpoint, final_record=step.record,
                         loop_record=final_record, final_retrain=info)
    return result
