"""The baseline stage started from a yolov5 checkpoint (model.checkpoint): evaluated as it is with
train.epochs 0, finetuned with N > 0, classes checked; and what params refuse around it."""

from __future__ import annotations

import hashlib

import pytest
import torch
from flows.baseline import baseline_flow
from tests.yolov5_models import make_model, save_like_train_py, yolov5_yaml

from conftest import TINY_EVAL, tiny_train_params
from slimloop.checkpoint import load_checkpoint, load_model
from slimloop.config import CompressParams, DataParams, ModelParams, Params, RetrainParams
from slimloop.errors import CheckpointError
from slimloop.evaluate import evaluate
from slimloop.model.yolov5_import import import_yolov5

NAMES = ("barcode", "qrcode")  # the synthetic dataset's classes


def tiny_yolov5(names=NAMES):
    """yolov5n at an eighth of its width (8..32 channels): quick to evaluate and finetune."""
    return make_model(yolov5_yaml("yolov5n", width_multiple=0.125), names=names)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with imports/best.pt saved as yolov5's train.py saves it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imports").mkdir()
    save_like_train_py(tmp_path / "imports" / "best.pt", tiny_yolov5())
    return tmp_path


def _params(data, epochs: int, **model) -> Params:
    return Params(data=DataParams(out_dir=str(data)), model=ModelParams(checkpoint="imports/best.pt", **model),
                  train=tiny_train_params(epochs=epochs), eval=TINY_EVAL)


def test_epochs_0_measures_the_import_as_it_is(project, tiny_data):
    out = project / "models" / "baseline"
    out.mkdir(parents=True)
    (out / "rewind.safetensors").write_bytes(b"stale, of another model")
    record = baseline_flow.fn(_params(tiny_data, 0), out, project / "metrics" / "baseline.json", progress=False)
    digest = hashlib.sha256((project / "imports" / "best.pt").read_bytes()).hexdigest()
    assert record["epochs"] == 0 and record["imported"]["sha256"] == digest
    assert record["imported"]["weights"] == "ema" and record["anchors"]["refit"] is False
    assert not (out / "last.safetensors").exists() and not (out / "rewind.safetensors").exists()  # no training
    imported = import_yolov5("imports/best.pt", names=NAMES).model
    best = load_model(out / "best.safetensors")
    assert all(torch.equal(v, imported.state_dict()[k]) for k, v in best.state_dict().items())
    assert load_checkpoint(out / "best.safetensors").meta["imported"]["sha256"] == digest
    expected = evaluate(imported, tiny_data, "val", 128, TINY_EVAL, progress=False)
    assert record["map"] == expected["map"] and record["map50"] == expected["map50"]
    assert (out / "model.onnx").is_file() and (out / "spec.json").is_file()


def test_epochs_n_finetunes_the_import(project, tiny_data):
    out = project / "models" / "baseline"
    params = _params(tiny_data, 1).model_copy(update={"retrain": RetrainParams(mode="rewind", rewind_epoch=1)})
    record = baseline_flow.fn(params, out, project / "metrics" / "baseline.json", progress=False)
    assert record["epochs"] == 1 and (out / "last.safetensors").is_file() and (out / "rewind.safetensors").is_file()
    imported = import_yolov5("imports/best.pt", names=NAMES).model.state_dict()
    tuned = load_model(out / "best.safetensors").state_dict()
    assert tuned.keys() == imported.keys()
    assert not all(torch.equal(tuned[k], imported[k]) for k in tuned)  # it trained from the import
    assert load_checkpoint(out / "best.safetensors").meta["imported"]["form"] == "checkpoint"


def test_classes_must_be_the_datasets(project, tiny_data):
    save_like_train_py(project / "imports" / "best.pt", tiny_yolov5(names=("qrcode", "barcode")))
    with pytest.raises(CheckpointError, match=r"\['qrcode', 'barcode'\] are not the dataset's \['barcode', 'qrcode'\]"):
        baseline_flow.fn(_params(tiny_data, 0), project / "out", project / "m.json", progress=False)


def test_params_around_an_import():
    with pytest.raises(ValueError, match="train.epochs is 0, which only means something with model.checkpoint"):
        Params(train=tiny_train_params(epochs=0))
    with pytest.raises(ValueError, match="retrain.mode rewind restores .* finetune it at least that long"):
        Params(model=ModelParams(checkpoint="imports/best.pt"), train=tiny_train_params(epochs=0),
               retrain=RetrainParams(mode="rewind"))
    with pytest.raises(ValueError, match="set compress.final_epochs"):
        Params(model=ModelParams(checkpoint="imports/best.pt"), train=tiny_train_params(epochs=0),
               compress=CompressParams(final_retrain="finetune", final_epochs=None))
    with pytest.raises(ValueError, match="inside imports/"):
        ModelParams(checkpoint="/tmp/best.pt")
    with pytest.raises(ValueError, match="set checkpoint_yaml"):
        ModelParams(checkpoint="imports/w.safetensors")
    with pytest.raises(ValueError, match="at most one of spec"):
        ModelParams(checkpoint="imports/best.pt", spec="models/compressed/spec.json")
    ok = Params(model=ModelParams(checkpoint="imports/best.pt"), train=tiny_train_params(epochs=0),
                compress=CompressParams(final_retrain="finetune", final_epochs=3))
    assert ok.train.epochs == 0
