"""Importing yolov5 models: checkpoints as train.py saves them, state dicts with their yaml, models
pruned elsewhere; outputs match yolov5's own forward; unsupported rows and misfit tensors are named."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tests.yolov5_models import (
    make_model,
    save_like_train_py,
    spp_yaml,
    yolov5_forward,
    yolov5_yaml,
)

from slimloop.errors import CheckpointError, UnsupportedModelError
from slimloop.model import build_model
from slimloop.model.spec import SPPFSpec
from slimloop.model.yolov5_import import import_yolov5

NAMES = ("barcode", "qrcode")


def _inputs(imgsz: int = 128) -> torch.Tensor:
    return torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))  # (2, 3, H, W)


def _ours(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)  # (B, N, 5 + nc)


@pytest.mark.parametrize("cfg", ["yolov5n", "yolov5s", "spp"])
def test_train_py_checkpoint_matches_yolov5_forward(tmp_path, cfg):
    """n and s (v6+ SPPF) and an older SPP model: the import computes what yolov5 computes."""
    model = make_model(spp_yaml() if cfg == "spp" else cfg, names=NAMES)
    path = save_like_train_py(tmp_path / "best.pt", model)
    imported = import_yolov5(path, names=NAMES)
    x = _inputs()
    ours = _ours(imported.model, x)
    # exactly yolov5's forward of the fp16 weights it stored ...
    stored = yolov5_forward(copy.deepcopy(model).half().float(), x)
    assert ours.shape == stored.shape == (2, 3 * (16 * 16 + 8 * 8 + 4 * 4), 7)
    assert torch.allclose(ours, stored, rtol=1e-4, atol=1e-3)
    # ... and the fp32 original to fp16 precision (boxes in px, then probabilities)
    original = yolov5_forward(model, x)
    assert torch.allclose(ours[..., :4], original[..., :4], rtol=2e-3, atol=0.5)
    assert torch.allclose(ours[..., 4:], original[..., 4:], atol=2e-3)
    assert original[..., 4].std() > 0.1  # objectness spread over (0, 1), not a constant prior
    spec = imported.model.spec
    assert spec.detect.names == NAMES and spec.detect.strides == (8, 16, 32)
    assert spec.detect.anchors[2][2] == (373.0, 326.0)
    assert isinstance(spec.layers[9], SPPFSpec) and spec.layers[9].kernel == 5
    assert imported.info["weights"] == "ema" and imported.info["epoch"] == 3
    assert imported.info["stored_dtypes"] == ["float16"] and imported.info["widths_as_yaml"]
    assert all(p.dtype == torch.float32 for p in imported.model.parameters())


def test_ema_preferred_then_model(tmp_path):
    model, ema = make_model(names=NAMES, seed=0), make_model(names=NAMES, seed=1)
    x = _inputs()
    both = import_yolov5(save_like_train_py(tmp_path / "a.pt", model, ema=ema), names=NAMES)
    assert torch.allclose(_ours(both.model, x), yolov5_forward(copy.deepcopy(ema).half().float(), x), atol=1e-3)
    stripped = {"model": copy.deepcopy(model).half(), "ema": None, "epoch": -1, "optimizer": None}
    torch.save(stripped, tmp_path / "b.pt")  # what yolov5's strip_optimizer leaves
    only = import_yolov5(tmp_path / "b.pt", names=NAMES)
    assert only.info["weights"] == "model"
    assert torch.allclose(_ours(only.model, x), yolov5_forward(copy.deepcopy(model).half().float(), x), atol=1e-3)


def test_class_names_must_match_the_dataset(tmp_path):
    path = save_like_train_py(tmp_path / "best.pt", make_model(names=("dog", "cat")))
    with pytest.raises(CheckpointError, match=r"\['dog', 'cat'\] are not the dataset's \['barcode', 'qrcode'\]"):
        import_yolov5(path, names=NAMES)
    with pytest.raises(CheckpointError, match="another order"):
        import_yolov5(path, names=("cat", "dog"))


def test_pruned_elsewhere_imports_by_its_tensor_shapes(tmp_path):
    """torch-pruning narrows a yolov5 model to widths its yaml does not predict (not multiples of 8)."""
    import torch_pruning as tp

    model = make_model(names=NAMES)
    pruner = tp.pruner.MagnitudePruner(model, torch.rand(1, 3, 64, 64), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.3, ignored_layers=[model.model[-1]])
    pruner.step()
    model.eval()
    assert model.model[3].conv.out_channels == 44  # 64 in yolov5n.yaml
    imported = import_yolov5(save_like_train_py(tmp_path / "pruned.pt", model), names=NAMES)
    assert imported.model.spec.layers[3].out_chs == 44 and not imported.info["widths_as_yaml"]
    x = _inputs()
    assert torch.allclose(_ours(imported.model, x), yolov5_forward(copy.deepcopy(model).half().float(), x),
                          rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_state_dict_plus_yaml(tmp_path, form):
    model = make_model(names=NAMES)
    state = copy.deepcopy(model).half().state_dict()
    weights = tmp_path / f"weights.{form}"
    if form == "pt":
        torch.save(state, weights)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, weights)
    cfg = tmp_path / "yolov5n.yaml"
    cfg.write_text(yaml.safe_dump({**model.yaml, "nc": 2}))
    imported = import_yolov5(weights, cfg, names=NAMES)
    assert imported.info["form"] == ("state_dict" if form == "pt" else "safetensors")
    assert imported.info["names_from"] == "dataset"  # a state dict carries no class names
    x = _inputs()
    assert torch.allclose(_ours(imported.model, x), yolov5_forward(copy.deepcopy(model).half().float(), x),
                          rtol=1e-4, atol=1e-3)
    with pytest.raises(CheckpointError, match="the model detects 2 classes, the dataset has 3"):
        import_yolov5(weights, cfg, names=("a", "b", "c"))


def test_full_checkpoint_given_a_yaml_says_so(tmp_path):
    path = save_like_train_py(tmp_path / "best.pt", make_model(names=NAMES))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump(yolov5_yaml()))
    with pytest.raises(CheckpointError, match="a full yolov5 checkpoint .* leave model.checkpoint_yaml empty"):
        import_yolov5(path, cfg)


def _state_and_yaml(tmp_path, state: dict, cfg: dict):
    torch.save(state, tmp_path / "w.pt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "w.pt", tmp_path / "m.yaml"


def test_missing_left_over_and_misshapen_tensors_name_their_layer(tmp_path):
    model = make_model(names=NAMES)
    cfg = {**model.yaml, "nc": 2}
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "model.4.m.0.cv2.bn.running_var"}
    with pytest.raises(CheckpointError, match=r"model\.4\.m\.0\.cv2\.bn\.running_var \(row 4 \(backbone 4: C3 \[256\]\)\): missing"):
        import_yolov5(*_state_and_yaml(tmp_path, missing, cfg))
    extra = {**state, "model.9.cv1.extra": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"model\.9\.cv1\.extra \(row 9 .*SPPF.*\): left over"):
        import_yolov5(*_state_and_yaml(tmp_path, extra, cfg))
    bad = {**state, "model.2.cv3.conv.weight": torch.zeros(32, 24, 1, 1)}  # reads 16 + 16 channels
    with pytest.raises(CheckpointError, match=r"model\.2\.cv3\.conv\.weight \(row 2 .*C3.*\): the checkpoint has \(32, 24, 1, 1\)"):
        import_yolov5(*_state_and_yaml(tmp_path, bad, cfg))


def test_unsupported_modules_name_themselves_and_their_row(tmp_path):
    ghost = make_model(yolov5_yaml("hub/yolov5s-ghost"), names=NAMES)
    with pytest.raises(UnsupportedModelError, match=r"row 1 \(backbone 1: GhostConv .*\): .*GhostConv"):
        import_yolov5(save_like_train_py(tmp_path / "ghost.pt", ghost), names=NAMES)
    leaky = make_model(yolov5_yaml("hub/yolov5s-LeakyReLU"), names=NAMES)
    with pytest.raises(UnsupportedModelError, match="activation 'nn.LeakyReLU"):
        import_yolov5(save_like_train_py(tmp_path / "leaky.pt", leaky), names=NAMES)
    odd = spp_yaml()
    odd["backbone"][9] = [-1, 1, "SPP", [1024, [3, 7, 11]]]
    with pytest.raises(UnsupportedModelError, match=r"row 9 .*SPP kernels \[3, 7, 11\]"):
        import_yolov5(save_like_train_py(tmp_path / "spp.pt", make_model(odd, names=NAMES)), names=NAMES)


def test_imported_spec_round_trips_and_trains(tmp_path):
    """The import is an ordinary slimloop model: its spec rebuilds it, and it trains (raw maps in train mode)."""
    imported = import_yolov5(save_like_train_py(tmp_path / "best.pt", make_model(names=NAMES)), names=NAMES)
    rebuilt = build_model(imported.model.spec)
    rebuilt.load_state_dict(imported.model.state_dict(), strict=True)
    raw = imported.model.train()(_inputs(64))
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 8, 7), (2, 3, 4, 4, 7), (2, 3, 2, 2, 7)]
