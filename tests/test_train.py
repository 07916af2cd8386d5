"""Training: the pieces fit together (a tiny model overfits), and resume is exact."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_EVAL, tiny_train_params
from slimloop.checkpoint import load_checkpoint, load_model
from slimloop.config import TrainParams
from slimloop.errors import TrainingError
from slimloop.evaluate import evaluate
from slimloop.model import build_model
from slimloop.train import TrainHooks, seed_everything, train


class Stop(Exception):
    """Raised by a callback to kill a run after an epoch."""


def _model(spec):
    seed_everything(0)
    return build_model(spec)


def test_tiny_model_overfits_eight_images(tiny_data, tiny_spec, tmp_path):
    params = tiny_train_params(epochs=80, lr0=0.1, ema=False)
    result = train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path, progress=False)
    model = load_model(result.best)
    metrics = evaluate(model, tiny_data, "train", 128, TINY_EVAL, progress=False)
    assert metrics["map50"] >= 0.9, metrics
    assert result.history[0]["train/loss"] > result.history[-1]["train/loss"]


def test_resume_gives_identical_weights(tiny_data, tiny_spec, tmp_path):
    params = tiny_train_params(epochs=3)
    full = train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path / "full", progress=False)

    def stop_after_first(epoch, model, row):
        if epoch == 0:
            raise Stop

    hooks = TrainHooks(on_epoch_end=[stop_after_first])
    with pytest.raises(Stop):
        train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path / "cut", hooks=hooks, progress=False)
    assert load_checkpoint(tmp_path / "cut" / "last.safetensors").meta["epoch"] == 1
    resumed = train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path / "cut", progress=False)
    a = load_checkpoint(full.last).state_dict
    b = load_checkpoint(resumed.last).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["train/loss"] for r in full.history] == [r["train/loss"] for r in resumed.history]


def test_changed_params_start_over(tiny_data, tiny_spec, tmp_path):
    train(_model(tiny_spec), tiny_data, tiny_train_params(epochs=1), TINY_EVAL, tmp_path, progress=False)
    result = train(_model(tiny_spec), tiny_data, tiny_train_params(epochs=1, lr0=0.001), TINY_EVAL,
                   tmp_path, progress=False)
    assert len(result.history) == 1
    assert load_checkpoint(result.last).meta["train"]["lr0"] == 0.001


def test_nan_loss_names_epoch_and_step_and_keeps_checkpoint(tiny_data, tiny_spec, tmp_path):
    params = tiny_train_params(epochs=2)

    def poison(imgs, feats, raw):
        bad = torch.tensor(float("nan")) if epochs_seen else torch.zeros(())
        return bad, {}

    epochs_seen: list[int] = []
    hooks = TrainHooks(extra_loss=poison, on_epoch_end=[lambda e, m, r: epochs_seen.append(e)])
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 2, step 1"):
        train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path, hooks=hooks, progress=False)
    assert load_checkpoint(tmp_path / "last.safetensors").meta["epoch"] == 1


def test_sparsity_hook_sees_unscaled_grads_and_runs(tiny_data, tiny_spec, tmp_path):
    calls = []

    def after_backward(model, progress):
        calls.append(progress)
        return {"l1": 1.0}

    result = train(_model(tiny_spec), tiny_data, tiny_train_params(epochs=2), TINY_EVAL, tmp_path,
                   hooks=TrainHooks(after_backward=after_backward), progress=False)
    assert calls == [0.0, 0.5]
    assert result.history[-1]["train/l1"] == 1.0


def test_curves_are_logged_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    """dvclive asks git for HEAD; a fresh `git init` has none, and training must not fail on it."""
    import subprocess
    import sys

    from slimloop.trainlog import open_live

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    live = open_live(tmp_path / "run", resume=False)
    live.log_metric("loss", 1.5)
    live.next_step()
    live.end()
    assert "loss" in (tmp_path / "run" / "live" / "metrics.json").read_text()


def test_a_finished_run_is_not_resumed_for_another_model_or_dataset(tiny_data, tiny_spec, tmp_path):
    """`models/baseline` persists between `dvc repro` runs: a finished run there must only be
    returned for the same starting weights and the same data, never for a changed model or dataset."""
    import shutil

    from conftest import TINY_EVAL, tiny_train_params
    from slimloop.model import build_model
    from slimloop.train import run_identity, seed_everything, train

    params = tiny_train_params(epochs=1)
    seed_everything(0)
    model = build_model(tiny_spec)
    same = run_identity(model, tiny_data)
    assert run_identity(model, tiny_data) == same
    seed_everything(1)
    assert run_identity(build_model(tiny_spec), tiny_data)["init"] != same["init"]
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "val.json").write_text((other / "val.json").read_text().replace('"qrcode"', '"qr"'))
    assert run_identity(model, other)["data"] != same["data"]
    first = train(model, tiny_data, params, TINY_EVAL, tmp_path / "run", progress=False)
    stamp = first.last.stat().st_mtime_ns
    train(build_model(tiny_spec), other, params, TINY_EVAL, tmp_path / "run", progress=False)
    assert first.last.stat().st_mtime_ns != stamp  # trained again, not handed the old run


def test_ema_blends_floats_by_the_decay_and_copies_counters():
    from slimloop.optim import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ModelEMA(model, max_decay=0.9, tau=1.0)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    d = ema.decay()
    assert 0 < d < 0.9
    for name, value in ema.ema.state_dict().items():
        src = model.state_dict()[name]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, d * before[name] + (1 - d) * src)
        else:
            assert torch.equal(value, src)


def test_loader_workers_do_not_change_the_run(tiny_data, tiny_spec, tmp_path, monkeypatch):
    """The loader is built once (persistent workers) and told each epoch; every epoch's batches
    are the same with or without workers, so the trained weights are too."""
    from slimloop.data.dataset import DetectionDataset

    epochs: list[int] = []
    original = DetectionDataset.set_epoch
    monkeypatch.setattr(DetectionDataset, "set_epoch", lambda self, e: (epochs.append(e), original(self, e))[1])
    runs = {}
    for workers in (0, 1):
        params = tiny_train_params(epochs=2, workers=workers, augment=TrainParams().augment)
        result = train(_model(tiny_spec), tiny_data, params, TINY_EVAL, tmp_path / str(workers), progress=False)
        runs[workers] = load_checkpoint(result.last).state_dict
    assert epochs == [0, 1, 0, 1]
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
