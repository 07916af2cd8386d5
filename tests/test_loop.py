"""The loop's stop/rollback decision, the loop end to end on a tiny model, and the control model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import NO_FINAL, NO_TARGET, TINY_EVAL, TRAIN_LR, tiny_train_params
from slimloop.checkpoint import load_checkpoint, save_checkpoint
from slimloop.compress.control import control_spec, fit_width, train_control
from slimloop.compress.decide import accepted, retention, smaller_step, target_reached
from slimloop.compress.loop import run_loop
from slimloop.compress.retrain import REWIND_NAME, rewind_saver, scratch_epochs
from slimloop.config import (
    CompressParams,
    DistillParams,
    ModelParams,
    Params,
    PruneParams,
    RetrainParams,
    SparseParams,
    TargetParams,
)
from slimloop.errors import ConfigError
from slimloop.measure import KEYS
from slimloop.model import build_model, conv_widths
from slimloop.profile import gflops
from slimloop.train import TrainHooks, seed_everything, train

BASE = {"map": 0.50, "gflops": 10.0, "params": 1000, "latency_quick_ms": 20.0}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the count afterwards


def rec(map_, gflops_, params=None, latency=None):
    return {"map": map_, "gflops": gflops_, "params": params or int(gflops_ * 100), "latency_quick_ms": latency or 2 * gflops_}


def test_a_step_is_accepted_by_what_it_keeps_of_its_parent():
    compress = CompressParams(min_retention=0.6)
    assert accepted(rec(0.30, 8.0), rec(0.5, 10.0), compress)  # keeps exactly 60%
    assert not accepted(rec(0.29, 8.0), rec(0.5, 10.0), compress)
    assert retention(rec(0.1, 1.0), rec(0.0, 1.0)) == 1.0  # a parent with no mAP: nothing to lose
    assert accepted(rec(0.03, 8.0), rec(0.05, 10.0), compress)  # relative: the same rule on a hard dataset


def test_backtracking_halves_the_step_down_to_the_floor():
    compress = CompressParams(step_ratio=0.4, min_step_ratio=0.1)
    assert smaller_step(0.4, compress) == 0.2 and smaller_step(0.2, compress) == 0.1
    assert smaller_step(0.1, compress) is None


def test_targets_all_must_be_met():
    both = TargetParams(gflops_ratio=0.6, params_ratio=None, latency_ms=10.0)
    assert not target_reached(rec(0.49, 6.0, latency=12.0), BASE, both)  # gflops met, latency not
    assert target_reached(rec(0.49, 5.0, latency=9.0), BASE, both)
    assert target_reached(rec(0.49, 8.0, params=700), BASE, TargetParams(gflops_ratio=None, params_ratio=0.7))
    assert not target_reached(rec(0.49, 1.0), BASE, NO_TARGET)  # no target: never reached


def test_params_sections_validate_and_name_keys():
    with pytest.raises(ValueError, match="min_step_ratio"):
        CompressParams(step_ratio=0.2, min_step_ratio=0.3)
    with pytest.raises(ValueError, match="multiple"):
        Params.model_validate({"pad": {"multiple": 3}})
    with pytest.raises(ValueError, match="compress.step_ratio"):
        Params.model_validate({"compress": {"step_ratio": 1.0}})
    with pytest.raises(ValueError, match="target.gflops_ratio"):
        Params.model_validate({"target": {"gflops_ratio": 0}})
    with pytest.raises(ValueError, match="distill.temperature"):
        Params.model_validate({"distill": {"temperature": 0}})


@pytest.fixture(scope="module")
def baseline(tiny_data, tiny_spec, tmp_path_factory):
    """A baseline trained 2 epochs that keeps its epoch-1 weights for rewinding."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("baseline")
    seed_everything(0)
    hooks = TrainHooks(on_epoch_end=[rewind_saver(out, 1)])
    result = train(build_model(tiny_spec), tiny_data, tiny_train_params(epochs=2), TINY_EVAL, out,
                   hooks=hooks, progress=False)
    return result.best


def _params(**sections):
    base = dict(train=tiny_train_params(epochs=1), eval=TINY_EVAL, sparse=SparseParams(epochs=1, lam=1e-3, lr0=None),
                prune=PruneParams(min_channels=2), retrain=RetrainParams(epochs=1, **TRAIN_LR),
                distill=DistillParams(mode="off", epochs=1),
                compress=CompressParams(iterations=3, step_ratio=0.3, **NO_FINAL), target=NO_TARGET)
    return Params(**{**base, **sections})


def test_rewind_checkpoint_is_the_early_epoch(baseline):
    early, last = load_checkpoint(baseline.parent / REWIND_NAME), load_checkpoint(baseline.parent / "last.safetensors")
    assert early.meta == {"step": "rewind", "epoch": 1} and last.meta["epoch"] == 2
    key = "layers.0.conv.weight"
    assert not torch.equal(early.state_dict[key], last.state_dict[key])


def test_loop_backtracks_then_gives_up_and_keeps_the_baseline(baseline, tiny_data, tmp_path):
    calls = []

    def run_step(name, fn, kwargs):
        calls.append(name)
        assert str(kwargs.get("out_dir", tmp_path)).startswith(str(tmp_path))
        return fn(**kwargs)

    base_gflops = gflops(build_model(load_checkpoint(baseline).spec), 128)
    reference = {**rec(1.0, base_gflops), "imgsz": 128}
    retrain = RetrainParams(mode="scratch", epochs=2, scratch_budget=True, budget_cap=3.0)
    compress = CompressParams(iterations=3, step_ratio=0.3, min_step_ratio=0.075, min_retention=0.99,
                              **{**NO_FINAL, "final_retrain": "scratch"})
    result = run_loop(baseline, reference, _params(retrain=retrain, compress=compress), tiny_data, tmp_path,
                      run_step=run_step)
    # one sparse run, then cuts of 0.3, 0.15 and 0.075, each rejected; no final retraining of the baseline
    assert calls == ["sparse_train"] + ["prune", "pad", "retrain"] * 3
    assert (result.decision.reason, result.decision.best) == ("cannot_compress", 0)
    assert result.final_checkpoint == baseline and result.final_record is reference
    (it,) = result.iterations
    assert it["iteration"] == 1 and not it["accepted"] and it["map_drop"] > 0.01
    assert [a["ratio"] for a in it["attempts"]] == pytest.approx([0.3, 0.15, 0.075], abs=1e-6)
    assert not any(a["accepted"] for a in it["attempts"]) and all(a["retention"] < 0.99 for a in it["attempts"])
    assert set(it["steps"]) == {"sparse", "pruned", "padded", "retrained", "distilled"}
    assert it["steps"]["distilled"] is None and it["final_step"] == "retrained"
    for step in ("sparse", "pruned", "padded", "retrained"):
        assert set(KEYS) <= set(it["steps"][step])
    retrained, padded = it["steps"]["retrained"], it["steps"]["padded"]
    assert retrained["mode"] == "scratch" and retrained["distill"] == "off"
    assert retrained["epochs"] == scratch_epochs(2, base_gflops, padded["gflops"], 3.0)  # scratch-B
    assert it["attempts"][0]["epochs"] > 2  # the largest cut trained longest
    assert 0 < it["kept_fraction"] < 1 and it["epochs"] == 1 + retrained["epochs"]
    assert it["epochs_spent"] == 1 + sum(a["epochs"] for a in it["attempts"])
    assert build_model(load_checkpoint(it["checkpoint"]).spec)  # the spec dict is the checkpoint's
    assert it["spec"] == load_checkpoint(it["checkpoint"]).spec.to_dict()
    summary = result.summary()
    assert summary["final_iteration"] == 0 and summary["reason"] == "cannot_compress"
    assert len(summary["first_attempts"]) == 3
    json.dumps(result.iterations)
    json.dumps(summary)


def test_loop_stops_at_target_with_rewind_and_joint_distillation(baseline, tiny_data, tmp_path):
    base_gflops = gflops(build_model(load_checkpoint(baseline).spec), 128)
    reference = {**rec(0.0, base_gflops), "imgsz": 128}
    params = _params(retrain=RetrainParams(mode="rewind", epochs=1, rewind_epoch=1),
                     distill=DistillParams(mode="joint", epochs=1), target=TargetParams(gflops_ratio=0.9, params_ratio=None))
    result = run_loop(baseline, reference, params, tiny_data, tmp_path)
    assert (result.decision.reason, result.decision.best) == ("target_reached", 1)
    (it,) = result.iterations
    assert it["accepted"] and result.final_checkpoint == load_checkpoint(it["checkpoint"]).path
    retrained = it["steps"]["retrained"]
    assert retrained["mode"] == "rewind" and retrained["distill"] == "joint"
    assert set(retrained["distill_terms"]) >= {"kd_obj", "kd_cls", "kd_kl", "kd_box", "kd_feat"}
    meta = load_checkpoint(result.final_checkpoint).meta
    assert "rewind" in meta and "teacher" in meta
    assert 0.85 * base_gflops < result.final_record["gflops"] <= 0.9 * base_gflops + 1e-6  # landed on it
    assert it["landed"] and 0 < it["ratio"] < 0.3 and it["steps"]["pruned"]["landed"]


def test_the_last_iteration_reaches_a_target_a_step_would_miss(baseline, tiny_data, tmp_path):
    """One iteration of a 0.1 step cannot reach 0.7x the GFLOPs: with compress.reach it cuts just
    enough more to meet it (target_reached); with reach off it stops short (max_iterations)."""
    base_gflops = gflops(build_model(load_checkpoint(baseline).spec), 128)
    reference = {**rec(0.0, base_gflops), "imgsz": 128}
    target = TargetParams(gflops_ratio=0.7, params_ratio=None)
    results = {}
    for reach in (0.75, None):
        compress = CompressParams(iterations=1, step_ratio=0.1, min_step_ratio=0.05, reach=reach, **NO_FINAL)
        results[reach] = run_loop(baseline, reference, _params(compress=compress, target=target), tiny_data,
                                  tmp_path / str(reach))
    reached, short = results[0.75], results[None]
    assert reached.decision.reason == "target_reached" and short.decision.reason == "max_iterations"
    (it,) = reached.iterations
    assert it["attempts"][0]["reached"] and it["landed"] and 0.1 < it["ratio"] <= 0.75
    assert 0.6 * base_gflops < reached.final_record["gflops"] <= 0.7 * base_gflops + 1e-6
    assert short.final_record["gflops"] > 0.7 * base_gflops and not short.iterations[0]["attempts"][0]["reached"]


def test_final_retrain_trains_the_final_structure_again_and_counts_its_epochs(baseline, tiny_data, tmp_path):
    calls = []

    def run_step(name, fn, kwargs):
        calls.append(name)
        return fn(**kwargs)

    base_gflops = gflops(build_model(load_checkpoint(baseline).spec), 128)
    reference = {**rec(0.0, base_gflops), "imgsz": 128}
    compress = CompressParams(iterations=1, final_retrain="scratch", final_epochs=2, final_lr0=0.05,
                              final_distill=True)
    params = _params(compress=compress, distill=DistillParams(mode="off", epochs=1))
    result = run_loop(baseline, reference, params, tiny_data, tmp_path, run_step=run_step)
    assert calls == ["sparse_train", "prune", "pad", "retrain", "final_retrain"]
    assert result.decision.best == 1
    (it,) = result.iterations
    loop_ckpt, final = load_checkpoint(it["checkpoint"]), load_checkpoint(result.final_checkpoint)
    assert final.spec == loop_ckpt.spec  # the same structure ...
    assert not torch.equal(final.state_dict["layers.0.conv.weight"], loop_ckpt.state_dict["layers.0.conv.weight"])
    assert final.meta["retrain"]["mode"] == "scratch" and "teacher" in final.meta  # ... trained anew, distilled
    assert final.meta["train"]["epochs"] == 2 and final.meta["train"]["lr0"] == 0.05
    assert result.epochs_to_final == (1 + 1) + 2  # the control's budget beyond the baseline counts it
    again = it["steps"]["final_retrain"]
    assert again is result.final_record and again["epochs"] == 2 and again["mode"] == "scratch"
    assert again["distill"] == "joint"
    summary = result.summary()
    assert summary["final_retrain"] == {"mode": "scratch", "epochs": 2, "lr0": 0.05}
    assert summary["loop_record"] is it["steps"]["retrained"] and summary["record"] is again
    assert summary["map_drop"] == round(reference["map"] - again["map"], 6)
    assert summary["epochs_total"] == 4
    json.dumps(summary)


def test_rewind_without_checkpoint_is_a_config_error(tiny_data, tiny_spec, tmp_path):
    ckpt = save_checkpoint(tmp_path / "base.safetensors", build_model(tiny_spec))
    with pytest.raises(ConfigError, match="retrain.rewind_epoch"):
        run_loop(ckpt, {**rec(0.5, 1.0), "imgsz": 128}, _params(retrain=RetrainParams(mode="rewind")),
                 tiny_data, tmp_path / "work")


@pytest.fixture(scope="module")
def make_spec(tiny_spec):
    return lambda w: control_spec(tiny_spec, ModelParams(base="n", depth_multiple=0.33), w)


def test_control_width_fits_target_and_is_monotone(make_spec):
    widths = []
    for target in (0.015, 0.03):
        fit = fit_width(make_spec, target, 128, high=0.125, tol=0.01)
        assert fit.fits and fit.gflops <= target
        assert gflops(build_model(make_spec(fit.width_multiple + 0.01)), 128) > target  # the widest
        outs = [w for name, w in conv_widths(fit.spec).items() if name.count(".") == 1 or name.endswith("cv3")]
        assert all(w % 8 == 0 for w in outs)  # layer outputs are YOLOv5's make_divisible(., 8)
        widths.append(fit.width_multiple)
    assert widths[0] < widths[1]
    assert not fit_width(make_spec, 1e-4, 128, high=0.125).fits  # below the narrowest: reported


def test_train_control_matches_final_gflops(baseline, tiny_data, tmp_path):
    target = 0.03
    params = _params(model=ModelParams(base="n", width_multiple=0.125, depth_multiple=0.33))
    record = train_control(baseline, target, 128, params, epochs=1, data_root=tiny_data, out_dir=tmp_path)
    assert set(KEYS) <= set(record) and record["step"] == "control"
    assert record["gflops"] <= target and record["fits"] and record["epochs"] == 1
    assert record["width_multiple"] <= 0.125
    spec = load_checkpoint(record["checkpoint"]).spec
    assert spec.detect.anchors == load_checkpoint(baseline).spec.detect.anchors
