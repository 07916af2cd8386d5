"""The compression loop (plan D): iterate sparse-train, prune, pad, retrain, distill; stop or roll back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slimloop.checkpoint import load_checkpoint
from slimloop.compress.distill import distill_step
from slimloop.compress.pad import pad_step
from slimloop.compress.prune import prune_step
from slimloop.compress.retrain import REWIND_NAME, retrain_step
from slimloop.compress.sparse import sparse_train_step
from slimloop.compress.steps import Lineage, StepResult, evaluate_step
from slimloop.compress.surgery import kept_fraction
from slimloop.config import CompressParams, Params, PruneParams, TargetParams
from slimloop.errors import ConfigError
from slimloop.model import conv_widths

StepFn = Callable[..., StepResult]
RunStep = Callable[[str, StepFn, dict[str, Any]], StepResult]
EPS = 1e-9  # metrics are rounded to 6 decimals: a drop equal to the tolerance is inside it


def call_step(name: str, fn: StepFn, kwargs: dict[str, Any]) -> StepResult:
    """The default ``run_step``: call the step directly."""
    return fn(**kwargs)


# ---- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether to stop after the records so far, why, and which model is final.

    ``best`` is an iteration number (0 = the baseline); ``accepted`` the iterations inside the
    tolerance; ``reason`` is ``target_reached``, ``tolerance_exceeded``, ``max_iterations`` or None.
    """

    stop: bool
    reason: str | None
    best: int
    accepted: tuple[int, ...]


def map_drop(record: dict[str, Any], baseline: dict[str, Any]) -> float:
    """mAP@0.5:0.95 lost against the baseline (absolute; negative when it improved)."""
    return float(baseline["map"]) - float(record["map"])


def target_reached(record: dict[str, Any], baseline: dict[str, Any], target: TargetParams) -> bool:
    """True when every target that is set is met (False when none is set)."""
    checks = []
    if target.gflops_ratio is not None:
        checks.append(record["gflops"] <= target.gflops_ratio * baseline["gflops"] + EPS)
    if target.params_ratio is not None:
        checks.append(record["params"] <= target.params_ratio * baseline["params"])
    if target.latency_ms is not None:
        checks.append(record["latency_quick_ms"] <= target.latency_ms)
    return bool(checks) and all(checks)


def best_iteration(records: list[dict[str, Any]], accepted: list[int] | tuple[int, ...]) -> int:
    """The accepted iteration with the fewest GFLOPs (ties: higher mAP, then earlier); 0 if none."""
    if not accepted:
        return 0
    return min(accepted, key=lambda k: (records[k - 1]["gflops"], -records[k - 1]["map"], k))


def decide(records: list[dict[str, Any]], baseline: dict[str, Any], compress: CompressParams,
           target: TargetParams) -> Decision:
    """Stop/rollback rule over the final records of iterations 1..n (``records[k - 1]``).

    Iterations are read in order: one whose mAP drop exceeds ``compress.tolerance`` stops the loop
    and is rolled back (not accepted); one that meets the targets stops it; otherwise the loop stops
    after ``compress.iterations``. The final model is the accepted iteration with the fewest GFLOPs.
    """
    accepted: list[int] = []
    for k, record in enumerate(records, start=1):
        if map_drop(record, baseline) > compress.tolerance + EPS:
            return Decision(True, "tolerance_exceeded", best_iteration(records, accepted), tuple(accepted))
        accepted.append(k)
        if target_reached(record, baseline, target):
            return Decision(True, "target_reached", best_iteration(records, accepted), tuple(accepted))
    done = len(records) >= compress.iterations
    return Decision(done, "max_iterations" if done else None, best_iteration(records, accepted), tuple(accepted))


# ---- the loop ----------------------------------------------------------------------------------


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
                "epochs_total": sum(it["epochs"] for it in self.iterations)
                + (self.final_retrain["epochs"] if self.final_retrain else 0),
                "map_drop": round(map_drop(self.final_record, self.baseline), 6),
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


def loop_prune_params(prune: PruneParams, compress: CompressParams) -> PruneParams:
    """Per-iteration prune params: ``compress.step_ratio`` of the remaining channels, or the absolute
    ``prune.threshold`` when that is the criterion."""
    if prune.threshold is not None:
        return prune
    return prune.model_copy(update={"ratio": compress.step_ratio})


def _retrain_kwargs(ctx: _Context, k: int, ckpt: Path, masks: list[Path], teacher: Lineage) -> dict[str, Any]:
    p = ctx.params
    kwargs: dict[str, Any] = dict(
        ckpt=ckpt, data_root=ctx.data_root, retrain=p.retrain, train_params=p.train, eval_params=p.eval,
        out_dir=ctx.work_dir / f"iter_{k}" / "retrain", imgsz=ctx.imgsz, progress=ctx.progress)
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


def _iteration(ctx: _Context, k: int, current: Path, masks: list[Path]) -> tuple[dict[str, Any], Path]:
    """Run iteration ``k`` from ``current``; ``masks`` (iterations 1..k-1) gains this one's masks."""
    p, run, out = ctx.params, ctx.run_step, ctx.work_dir / f"iter_{k}"
    common = dict(data_root=ctx.data_root, eval_params=p.eval, imgsz=ctx.imgsz)
    sparse = run("sparse_train", sparse_train_step, dict(
        ckpt=current, sparse=p.sparse, train_params=p.train, out_dir=out / "sparse", progress=ctx.progress,
        **common))
    pruned = run("prune", prune_step, dict(
        ckpt=sparse.checkpoint, prune=loop_prune_params(p.prune, p.compress), out_dir=out / "prune", **common))
    padded = run("pad", pad_step, dict(
        ckpt=sparse.checkpoint, masks=Path(pruned.extra["masks"]), pad=p.pad, recalibrate=p.prune.recalibrate,
        out_dir=out / "pad", **_auto_pad_kwargs(p), **common))
    masks.append(Path(padded.extra["masks"]))
    teacher = (Lineage(ctx.baseline_ckpt, tuple(masks)) if p.distill.teacher == "baseline"
               else Lineage(current, (masks[-1],)))
    retrained = run("retrain", retrain_step, _retrain_kwargs(ctx, k, padded.checkpoint, masks, teacher))
    final, distilled, epochs = retrained, None, p.sparse.epochs + retrained.record["epochs"]
    if p.distill.mode == "separate":
        distilled = run("distill", distill_step, dict(
            ckpt=retrained.checkpoint, teacher=teacher, distill=p.distill, train_params=p.train,
            out_dir=out / "distill", lr0=p.retrain.lr0, progress=ctx.progress, **common))
        final, epochs = distilled, epochs + p.distill.epochs
    spec = load_checkpoint(final.checkpoint).spec
    base_spec = load_checkpoint(ctx.baseline_ckpt).spec
    widths = {name: conv_widths(load_checkpoint(ckpt).spec)
              for name, ckpt in (("before", sparse.checkpoint), ("pruned", pruned.checkpoint),
                                 ("padded", padded.checkpoint))}
    results = {"sparse": sparse, "pruned": pruned, "padded": padded, "retrained": retrained, "distilled": distilled}
    steps = {name: r.record if r else None for name, r in results.items()}
    return {"iteration": k, "steps": steps, "final_step": "distilled" if distilled else "retrained",
            "spec": spec.to_dict(), "checkpoint": str(final.checkpoint),
            "checkpoints": {name: str(r.checkpoint) for name, r in results.items() if r},
            "kept_fraction": round(kept_fraction(base_spec, spec), 6), "epochs": epochs, "widths": widths,
            "gamma_histogram": sparse.extra.get("histogram", [])}, final.checkpoint


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


def run_loop(baseline_ckpt: Path, baseline_record: dict[str, Any], params: Params, data_root: Path,
             work_dir: Path, run_step: RunStep | None = None, rewind_ckpt: Path | None = None,
             progress: bool = False) -> LoopResult:
    """Compress the baseline iteratively until a target is met, the tolerance is exceeded (the
    offending iteration is rolled back) or ``compress.iterations`` have run; then, with
    ``compress.final_retrain``, train the final iteration's model once more (its record is the
    iteration's ``final_retrain`` step and the final record).

    Args:
        baseline_ckpt: the trained baseline (iteration 0).
        baseline_record: its metrics; measured again when taken at another size than the loop's.
        params: all sections (reads train, eval, sparse, prune, pad, retrain, distill, compress, target).
        data_root: canonical dataset folder.
        work_dir: every step writes under ``work_dir/iter_<k>/<step>`` (unless ``run_step`` moves it).
        run_step: ``run_step(name, fn, kwargs) -> StepResult`` runs each step (names:
            ``sparse_train``, ``prune``, ``pad``, ``retrain``, ``distill``, ``evaluate_baseline``,
            ``final_retrain``);
            the default calls ``fn(**kwargs)``. It may replace ``kwargs["out_dir"]``.
        rewind_ckpt: the baseline's early checkpoint (default ``rewind.safetensors`` beside it).
        progress: progress bars during training.

    Raises:
        ConfigError: ``retrain.mode`` is rewind and there is no rewind checkpoint.
    """
    ctx = _Context(params, Path(data_root), Path(work_dir), params.compress.imgsz or params.train.imgsz,
                   run_step or call_step, Path(baseline_ckpt), {},
                   _rewind_checkpoint(params, baseline_ckpt, rewind_ckpt), progress)
    baseline = _reference(ctx, baseline_record)
    ctx = replace(ctx, baseline=baseline)
    iterations: list[dict[str, Any]] = []
    checkpoints, masks = [ctx.baseline_ckpt], []
    decision = decide([], baseline, params.compress, params.target)
    while not decision.stop:
        k = len(iterations) + 1
        it, ckpt = _iteration(ctx, k, checkpoints[-1], masks)
        iterations.append(it)
        checkpoints.append(ckpt)
        records = [i["steps"][i["final_step"]] for i in iterations]
        decision = decide(records, baseline, params.compress, params.target)
    for it in iterations:
        it["accepted"] = it["iteration"] in decision.accepted
        it["map_drop"] = round(map_drop(it["steps"][it["final_step"]], baseline), 6)
    best = decision.best
    final_record = baseline if best == 0 else iterations[best - 1]["steps"][iterations[best - 1]["final_step"]]
    result = LoopResult(iterations, decision, baseline, checkpoints[best], final_record)
    retrained = _final_retrain(ctx, best, checkpoints[best], masks)
    if retrained is not None:
        step, info = retrained
        iterations[best - 1]["steps"]["final_retrain"] = step.record
        iterations[best - 1].setdefault("checkpoints", {})["final_retrain"] = str(step.checkpoint)
        result = replace(result, final_checkpoint=step.checkpoint, final_record=step.record,
                         loop_record=final_record, final_retrain=info)
    return result
