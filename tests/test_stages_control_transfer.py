"""The control stage and the transfer command, on the tiny dataset."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from flows.control import control_epochs, control_flow
from flows.transfer import transfer

from conftest import TINY_EVAL, tiny_train_params
from slimloop.checkpoint import load_checkpoint, save_checkpoint
from slimloop.config import ControlParams, DataParams, ModelParams, Params
from slimloop.errors import ConfigError
from slimloop.model import build_model, conv_widths, save_spec, yolov5_spec


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _params(tiny_data: Path, **sections) -> Params:
    base = dict(data=DataParams(out_dir=str(tiny_data)), train=tiny_train_params(epochs=1), eval=TINY_EVAL,
                model=ModelParams(base="n", width_multiple=0.125, depth_multiple=0.33))
    return Params(**{**base, **sections})


@pytest.fixture(scope="module")
def baseline_dir(tiny_spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    save_checkpoint(out / "best.safetensors", build_model(tiny_spec))
    return out


def test_control_epochs_default_is_baseline_plus_loop(tiny_data):
    params = _params(tiny_data, train=tiny_train_params(epochs=7))
    assert control_epochs(params, {"epochs_to_final": 12}) == 19
    fixed = params.model_copy(update={"control": ControlParams(epochs=3)})
    assert control_epochs(fixed, {"epochs_to_final": 12}) == 3


def test_control_stage_trains_to_final_gflops(tiny_data, baseline_dir, tmp_path):
    final = {"record": {"gflops": 0.03, "imgsz": 128}, "epochs_to_final": 0}
    (tmp_path / "final.json").write_text(json.dumps(final))
    record = control_flow.fn(_params(tiny_data), baseline_dir, tmp_path / "control", tmp_path, progress=False)
    written = json.loads((tmp_path / "control.json").read_text())
    assert written.pop("env")["packages"]["torch"] == metadata.version("torch")  # provenance, added on write
    assert written == json.loads(json.dumps(record))
    assert written["enabled"] and written["fits"] and written["gflops"] <= 0.03
    assert written["epochs"] == 1 and written["target_gflops"] == 0.03
    assert Path(written["checkpoint"]).exists()


def test_control_stage_disabled_writes_why(tiny_data, baseline_dir, tmp_path):
    params = _params(tiny_data, control=ControlParams(enabled=False))
    assert control_flow.fn(params, baseline_dir, tmp_path / "c", tmp_path, progress=False) == {"enabled": False}
    written = json.loads((tmp_path / "control.json").read_text())
    assert written.pop("env")["cpu"]["cores"] >= 1 and written == {"enabled": False}


def test_control_stage_without_final_names_the_stage(tiny_data, baseline_dir, tmp_path):
    with pytest.raises(ConfigError, match="final.json does not exist: run the compress stage"):
        control_flow.fn(_params(tiny_data), baseline_dir, tmp_path / "c", tmp_path, progress=False)


def test_transfer_keeps_widths_and_takes_the_new_classes(tiny_data, tmp_path):
    # a "pruned" spec found on another dataset with three classes, odd widths included
    source = yolov5_spec("n", nc=3, names=("a", "b", "c"), width_multiple=0.125, depth_multiple=0.33)
    widths = {k: max(2, v - 3) for k, v in conv_widths(source).items()}
    from slimloop.model import with_conv_widths

    source = with_conv_widths(source, widths)
    save_spec(source, tmp_path / "spec.json")
    record = transfer(_params(tiny_data), tmp_path / "spec.json", tiny_data, tmp_path / "run", epochs=1,
                      progress=False)
    trained = load_checkpoint(tmp_path / "run" / "best.safetensors").spec
    assert conv_widths(trained) == widths
    assert trained.detect.names == ("barcode", "qrcode") and trained.detect.nc == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["map"] == record["map"]


def test_transfer_names_a_missing_spec_or_dataset(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--spec: .*nope.json does not exist"):
        transfer(_params(tiny_data), tmp_path / "nope.json", tiny_data, tmp_path / "run")
    save_spec(yolov5_spec("n", nc=2, names=("x", "y"), width_multiple=0.125), tmp_path / "s.json")
    with pytest.raises(ConfigError, match="is not a prepared dataset"):
        transfer(_params(tiny_data), tmp_path / "s.json", tmp_path, tmp_path / "run")
