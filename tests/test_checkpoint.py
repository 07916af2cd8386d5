"""Checkpoints: safetensors round trip, clear errors on bad files, and no unpickling ever."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from slimloop.checkpoint import (
    file_sha256,
    load_checkpoint,
    load_model,
    load_state,
    save_checkpoint,
    save_state,
)
from slimloop.errors import CheckpointError
from slimloop.model import build_model, yolov5_spec


@pytest.fixture
def model(tiny_spec):
    torch.manual_seed(0)
    return build_model(tiny_spec).eval()


def test_round_trip_keeps_spec_weights_and_meta(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"step": "baseline", "parent": None})
    loaded = load_model(path)
    assert loaded.spec == model.spec
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), model(x))
    assert load_checkpoint(path).meta == {"step": "baseline", "parent": None}
    assert len(file_sha256(path)) == 64


def test_fp16_file_is_about_half(model, tmp_path):
    a = save_checkpoint(tmp_path / "a.safetensors", model)
    b = save_checkpoint(tmp_path / "b.safetensors", model, dtype=torch.float16)
    assert b.stat().st_size < 0.6 * a.stat().st_size


@pytest.mark.parametrize("cut", [0, 5, 100, -100])
def test_truncated_file_is_a_clear_error(model, tmp_path, cut):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_model(path)


def test_flipped_header_bytes_are_a_clear_error(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = bytearray(path.read_bytes())
    data[10:30] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_model(path)


def test_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="pickled .pt files are refused|not a safetensors"):
        load_model(path)
    with pytest.raises(CheckpointError):
        load_state(path)
    assert not marker.exists()


def test_spec_that_does_not_match_weights(model, tmp_path, tiny_spec):
    from slimloop.checkpoint import checkpoint_bytes
    from slimloop.model.build import conv_widths, with_conv_widths

    other = build_model(with_conv_widths(tiny_spec, {"layers.0": conv_widths(tiny_spec)["layers.0"] + 8}))
    data = checkpoint_bytes(other)
    # splice: the other model's spec header with this model's tensors
    from safetensors.torch import save

    from slimloop.checkpoint import FORMAT
    from slimloop.model.spec import spec_to_json

    bad = save({k: v.contiguous() for k, v in model.state_dict().items()},
               metadata={"format": FORMAT, "spec": spec_to_json(other.spec), "meta": "{}"})
    assert data  # the honest file is fine
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match=r"weights do not match the spec: .*layers\.0\.conv\.weight"):
        load_model(path)


def test_other_class_count_is_named(tmp_path):
    model = build_model(yolov5_spec("n", nc=3, width_multiple=0.125))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError, match="detects 3 classes, the dataset has 2"):
        load_model(path, nc=2)


def test_training_state_round_trip(model, tmp_path):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.rand(2, 3, 64, 64))[0].sum().backward()
    opt.step()
    state = {"epoch": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "pair": (1, "a")}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["epoch"] == 3 and back["pair"] == (1, "a")
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
