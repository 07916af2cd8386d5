"""Compression steps: sparsity, histograms, prune/pad/retrain/distill records, rewind, distillation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_EVAL, randomize_bn, tiny_train_params
from slimloop.checkpoint import load_checkpoint, load_model, save_checkpoint
from slimloop.compress.distill import DistillLoss, DistillWeights, channel_maps, distill_step
from slimloop.compress.groups import topology
from slimloop.compress.pad import pad_channels, pad_step
from slimloop.compress.prune import gamma_scores, prune_step, select_channels
from slimloop.compress.retrain import retrain_step, scratch_epochs
from slimloop.compress.sparse import (
    GammaHistogram,
    SparsityControl,
    gamma_values,
    sparse_hooks,
    sparse_lambda,
    sparse_train_step,
)
from slimloop.compress.steps import Lineage, apply_masks, load_masks, save_masks
from slimloop.compress.surgery import prune_model
from slimloop.config import (
    DistillParams,
    PadParams,
    PruneParams,
    RetrainParams,
    SparseParams,
)
from slimloop.measure import KEYS
from slimloop.model import build_model, conv_modules, conv_widths
from slimloop.report.plots import draw_gamma_histograms
from slimloop.train import seed_everything, train

KD_KEYS = ("kd_obj", "kd_cls", "kd_kl", "kd_box", "kd_feat")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the count afterwards


def _model(spec, seed=0):
    seed_everything(seed)
    return build_model(spec)


def _randomized(spec, seed=0):
    """Eval-mode model with random BN statistics and gammas in [0.2, 1]."""
    return randomize_bn(_model(spec, seed))


def _keep(model, ratio, min_channels=2):
    scores = gamma_scores(model, topology(model.spec))
    return select_channels(scores, ratio=ratio, min_channels=min_channels), scores


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", (1.0, 1.0, 1.0)), ("linear", (1.0, 0.55, 0.1)), ("cosine", (1.0, 0.55, 0.1)),
     ("rising", (0.1, 0.55, 1.0))],
)
def test_lambda_schedules(schedule, expected):
    sparse = SparseParams(lam=2e-3, schedule=schedule, low_fraction=0.1)
    got = [sparse_lambda(sparse, x) / 2e-3 for x in (0.0, 0.5, 1.0)]
    assert got == pytest.approx(list(expected))
    if schedule == "cosine":  # cosine stays higher than linear early on
        assert sparse_lambda(sparse, 0.25) > sparse_lambda(sparse.model_copy(update={"schedule": "linear"}), 0.25)


def test_sparsity_hook_drives_gammas_down(tiny_data, tiny_spec, tmp_path):
    params = tiny_train_params(epochs=2, ema=False, lr0=0.1)  # raw weights: EMA would lag
    means = {}
    for lam in (0.0, 5.0):
        hist = GammaHistogram.from_model(_model(tiny_spec))
        result = train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path / str(lam),
                       hooks=sparse_hooks(SparseParams(lam=lam), hist), progress=False)
        means[lam] = float(gamma_values(load_model(result.last)).mean())
        assert [r["epoch"] for r in hist.rows] == [0, 1, 2]
        assert result.history[-1]["train/lam"] == lam
    assert means[0.0] > 0.95  # BN gammas start at 1
    # grads are clipped to norm 10 after the hook, so a huge lam moves each gamma ~lr0 * 10 / sqrt(N)
    assert means[5.0] < means[0.0] - 0.04, means


def test_sparsity_control_raises_lam_until_enough_gammas_are_off(tiny_spec):
    model = _model(tiny_spec)
    control = SparsityControl(SparseParams(lam=1e-3, target_fraction=0.5, target_threshold=0.01, lam_growth=2.0))
    assert control.lam(0.3) == 1e-3
    control(0, model, {})  # every gamma is 1: short of the target, lam doubles
    assert control.lam(0.3) == 2e-3
    for conv in conv_modules(model).values():
        conv.bn.weight.data[: (conv.bn.weight.numel() + 1) // 2] = 1e-3
    control(1, model, {})  # at least half are off now: lam stays
    assert control.lam(0.3) == 2e-3
    assert [r["epoch"] for r in control.rows] == [1, 2] and control.rows[0]["below"] == 0.0
    assert control.rows[1]["below"] >= 0.5
    fixed = SparsityControl(SparseParams(lam=1e-3))  # no target: never adapts
    fixed(0, model, {})
    assert fixed.lam(0.9) == 1e-3


def test_sparse_baseline_trains_with_the_penalty_and_nothing_else_does():
    from slimloop.baseline import baseline_hooks
    from slimloop.config import BaselineParams, Params

    assert baseline_hooks(Params()).after_backward is None
    hooks = baseline_hooks(Params(baseline=BaselineParams(sparse=True, lam=0.5, schedule="rising")))
    assert hooks.after_backward is not None and len(hooks.on_epoch_end) == 1


def test_gamma_histogram_rows_and_png(tiny_spec, tmp_path):
    model = _model(tiny_spec)
    hist = GammaHistogram.from_model(model, bins=10)
    total = gamma_values(model).numel()
    for conv in conv_modules(model).values():
        conv.bn.weight.data[: conv.bn.weight.numel() // 2] = 0.0
    hist(0, model, {})
    first, second = hist.rows
    assert sum(first["counts"]) == sum(second["counts"]) == total
    assert first["counts"][0] == 0 and second["counts"][0] >= total // 2 - 30
    assert second["mean_abs"] < first["mean_abs"]
    json.dumps(hist.rows)
    path = draw_gamma_histograms(hist.rows, tmp_path / "hist.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]  # no temporary left behind


def test_gamma_histogram_rows_survive_a_resumed_run(tiny_spec, tmp_path):
    model, path = _model(tiny_spec), tmp_path / "hist.json"
    first = GammaHistogram.from_model(model, bins=8, path=path)
    first(0, model, {})
    first(1, model, {})
    again = GammaHistogram.from_model(model, bins=8, path=path)  # a resumed run: epochs 1, 2 skipped
    assert [r["epoch"] for r in again.rows] == [0, 1, 2]
    assert json.loads(path.read_text()) == again.rows
    other = GammaHistogram.from_model(model, bins=5, path=path)  # other edges: old rows dropped
    assert [r["epoch"] for r in other.rows] == [0]


def test_scratch_b_budget():
    assert scratch_epochs(10, base_gflops=4.0, pruned_gflops=2.0, cap=3.0) == 20
    assert scratch_epochs(10, base_gflops=4.0, pruned_gflops=0.5, cap=3.0) == 30  # capped
    assert scratch_epochs(10, base_gflops=4.0, pruned_gflops=4.0, cap=3.0) == 10
    assert scratch_epochs(3, base_gflops=1.0, pruned_gflops=0.7, cap=2.0) == 4  # round(4.29)
    assert scratch_epochs(5, base_gflops=1.0, pruned_gflops=2.0, cap=2.0) == 5  # never fewer


def _zero_pruned(model, keep):
    """Set gamma and beta of every channel outside ``keep`` to 0, so it outputs exactly 0."""
    topo = topology(model.spec)
    for name, conv in conv_modules(model).items():
        off = ~keep[topo.group_of[name]]
        conv.bn.weight.data[off] = 0.0
        conv.bn.bias.data[off] = 0.0


@pytest.mark.parametrize("pruned", [False, True])
def test_distill_terms_vanish_when_student_equals_teacher(tiny_spec, tmp_path, pruned):
    teacher = _randomized(tiny_spec)
    student, maps = teacher, None
    if pruned:
        keep, scores = _keep(teacher, 0.4)
        _zero_pruned(teacher, keep)
        student = prune_model(teacher, keep, probe=64).eval()
        maps = channel_maps(teacher, [save_masks(tmp_path / "m.safetensors", keep, scores)])
        assert [len(m) for m in maps] == [c.in_channels for c in student.detect.m]
    loss = DistillLoss(teacher, student, DistillWeights(box_conf=0.0), maps)  # box matched everywhere
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        feats, raw = student.forward_features(x)
        terms = loss.terms(x, feats, raw)
    assert set(terms) == set(KD_KEYS)
    assert all(float(v) < 1e-6 for v in terms.values()), terms
    if pruned:  # the identity-on-first-channels adapters would not line the channels up
        plain = DistillLoss(teacher, student, DistillWeights(), None)
        with torch.no_grad():
            assert float(plain.terms(x, feats, raw)["kd_feat"]) > 1e-3


def test_distill_loss_is_weighted_and_scaled_by_batch(tiny_spec):
    teacher, student = _randomized(tiny_spec, 0), _randomized(tiny_spec, 1)
    x = torch.rand(3, 3, 64, 64)
    feats, raw = student.forward_features(x)
    one = DistillLoss(teacher, student, DistillWeights())
    total, items = one(x, feats, raw)
    assert set(items) == set(KD_KEYS) and all(v > 0 for k, v in items.items() if k != "kd_box")
    assert float(total.detach()) == pytest.approx(3 * sum(items.values()), rel=1e-5)
    two = DistillLoss(teacher, student, DistillWeights(kl=2.0, feature=0.0))
    _, items2 = two(x, feats, raw)
    assert "kd_feat" not in items2 and two.modules() == []
    assert items2["kd_kl"] == pytest.approx(2 * items["kd_kl"], rel=1e-5)


def test_rewind_applies_the_same_masks_in_sequence(tiny_spec, tmp_path):
    """Masks of two iterations, chosen on other models, applied to the early weights in order."""
    early = _randomized(tiny_spec, 5)
    sparse1 = _randomized(tiny_spec, 6)
    keep1, scores1 = _keep(sparse1, 0.3)
    sparse2 = _randomized(prune_model(sparse1, keep1, probe=64).spec, 7)
    keep2, scores2 = _keep(sparse2, 0.3)
    files = [save_masks(tmp_path / "1.safetensors", keep1, scores1),
             save_masks(tmp_path / "2.safetensors", keep2, scores2)]
    assert all(load_masks(files[0])[0][g].equal(keep1[g]) for g in keep1)
    rewound = apply_masks(early, files)
    assert rewound.spec == prune_model(sparse2, keep2, probe=64).spec
    name = "layers.2.cv1"  # surviving weights are the early ones at the composed indices
    group = topology(tiny_spec).group_of[name]
    out_idx = torch.arange(keep1[group].numel())[keep1[group]][keep2[group]]
    w_early = conv_modules(early)[name].conv.weight
    in_keep = keep1["layers.1"].nonzero().flatten()[keep2["layers.1"]]
    expected = w_early[out_idx][:, in_keep]
    assert torch.equal(conv_modules(rewound)[name].conv.weight, expected)
    with pytest.raises(Exception, match="masks do not fit"):
        apply_masks(early, [files[1]])  # iteration 2's masks do not fit the unpruned spec


@pytest.fixture(scope="module")
def chain(tiny_data, tiny_spec, tmp_path_factory):
    """sparse -> prune -> pad -> retrain (finetune, joint distillation) -> distill, one epoch each."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chain")
    base = save_checkpoint(root / "base.safetensors", _model(tiny_spec))
    train_params = tiny_train_params(epochs=1)
    sp = sparse_train_step(base, tiny_data, SparseParams(epochs=1, lam=1e-3, lr0=None), train_params, TINY_EVAL,
                           root / "sparse", imgsz=128)
    pr = prune_step(sp.checkpoint, tiny_data, PruneParams(min_channels=2), TINY_EVAL,
                    root / "prune", imgsz=128, ratio=0.4)
    pd = pad_step(sp.checkpoint, pr.extra["masks"], tiny_data, PadParams(multiple=8), TINY_EVAL,
                  root / "pad", imgsz=128)
    teacher = Lineage(sp.checkpoint, (pd.extra["masks"],))
    distill = DistillParams(epochs=1)
    rt = retrain_step(pd.checkpoint, tiny_data, RetrainParams(epochs=1, lr0=0.005), train_params, TINY_EVAL,
                      root / "retrain", imgsz=128, distill=distill, teacher=teacher)
    ds = distill_step(rt.checkpoint, teacher, tiny_data, distill, train_params, TINY_EVAL, root / "distill",
                      imgsz=128, lr0=0.005)
    return {"base": base, "sparse": sp, "prune": pr, "pad": pd, "retrain": rt, "distill": ds, "root": root}


def test_the_prune_record_says_what_was_cut(chain):
    record = chain["prune"].record
    assert record["ratio"] == 0.4 and record["landed"] is False and record["cut_channels"] > 0
    assert 0.0 <= record["cut_gamma_below_1e-2"] <= 1.0
    assert 0 <= chain["sparse"].record["gamma_below_threshold"] <= 1 and chain["sparse"].record["lam_scale"] == 1.0


def test_every_step_returns_a_record_with_the_metric_keys(chain):
    for step in ("sparse", "prune", "pad", "retrain", "distill"):
        result = chain[step]
        assert set(KEYS) <= set(result.record), step
        assert result.record["step"] == step and result.record["imgsz"] == 128
        assert result.checkpoint.exists() and str(chain["root"] / step) in str(result.checkpoint)
        assert math.isfinite(result.record["map"]) and result.record["gflops"] > 0
    assert (chain["root"] / "sparse" / "gamma_hist.png").exists()
    rows = json.loads((chain["root"] / "sparse" / "gamma_hist.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1] and rows == chain["sparse"].extra["histogram"]


def test_prune_and_pad_cut_channels_and_round_up(chain, tiny_spec):
    pruned, padded = chain["prune"], chain["pad"]
    before = conv_widths(tiny_spec)
    w_pruned = conv_widths(load_checkpoint(pruned.checkpoint).spec)
    w_padded = conv_widths(load_checkpoint(padded.checkpoint).spec)
    assert pruned.record["params"] < chain["sparse"].record["params"]
    assert pruned.record["gflops"] < padded.record["gflops"] <= chain["sparse"].record["gflops"]
    assert pruned.extra["kept_fraction"] == pytest.approx(sum(w_pruned.values()) / sum(before.values()))
    for name, width in w_padded.items():
        assert w_pruned[name] <= width <= before[name]
        assert width % 8 == 0 or width == before[name]
    keep, scores = load_masks(pruned.extra["masks"])
    pad_keep, _ = load_masks(padded.extra["masks"])
    assert pad_channels(keep, scores, 8).keys() == pad_keep.keys()
    assert all((pad_keep[g] | keep[g]).equal(pad_keep[g]) for g in keep)


def test_retrain_and_distill_log_terms_and_keep_structure(chain):
    spec = load_checkpoint(chain["pad"].checkpoint).spec
    for step in ("retrain", "distill"):
        assert load_checkpoint(chain[step].checkpoint).spec == spec
        assert set(chain[step].record["distill_terms"]) == set(KD_KEYS)
    assert chain["retrain"].record["distill"] == "joint" and chain["retrain"].record["epochs"] == 1
    meta = load_checkpoint(chain["retrain"].checkpoint).meta
    assert meta["train"]["lr0"] == 0.005 and meta["step"] == "retrain" and "teacher" in meta


class _Stop(Exception):
    pass


@pytest.mark.parametrize("warmup, expected", [(None, 2.5), (0.0, 0.0), (0.5, 0.5)])
def test_finetune_and_sparse_train_with_their_own_lr_and_warmup(tiny_spec, tmp_path, monkeypatch, warmup,
                                                                 expected):
    """Sparse training and finetuning start from a trained model: sparse.lr0 and retrain.lr0 replace
    train.lr0, sparse training has no warm-up, finetuning takes retrain.warmup_epochs (null: train's)."""
    from slimloop.compress import retrain, sparse

    seen = []

    def fake_train(model, data_root, params, *args, **kwargs):
        seen.append(params)
        raise _Stop

    monkeypatch.setattr(sparse, "train", fake_train)
    monkeypatch.setattr(retrain, "train", fake_train)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", _model(tiny_spec))
    base = tiny_train_params(lr0=0.02, warmup_epochs=2.5)
    with pytest.raises(_Stop):
        sparse_train_step(ckpt, tmp_path, SparseParams(epochs=1, lr0=0.003), base, TINY_EVAL, tmp_path / "s")
    with pytest.raises(_Stop):
        retrain_step(ckpt, tmp_path, RetrainParams(epochs=2, lr0=0.004, warmup_epochs=warmup), base, TINY_EVAL,
                     tmp_path / "r")
    with pytest.raises(_Stop):  # scratch training keeps train's warm-up and lr
        retrain_step(ckpt, tmp_path, RetrainParams(mode="scratch", epochs=2, warmup_epochs=0.0), base, TINY_EVAL,
                     tmp_path / "x")
    sparse, finetune, scratch = seen
    assert (sparse.lr0, sparse.warmup_epochs, sparse.epochs) == (0.003, 0.0, 1)
    assert (finetune.lr0, finetune.warmup_epochs, finetune.epochs) == (0.004, expected, 2)
    assert (scratch.lr0, scratch.warmup_epochs) == (0.02, 2.5)
