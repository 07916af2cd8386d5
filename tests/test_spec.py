"""ModelSpec materialization, validation, file round trips, and the Detector built from it."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from slimloop.errors import ConfigError
from slimloop.model import (
    ModelSpec,
    SpecError,
    build_model,
    conv_modules,
    conv_widths,
    load_spec,
    save_spec,
    spec_from_json,
    spec_from_yaml,
    spec_to_json,
    spec_to_yaml,
    with_conv_widths,
    yolov5_spec,
)
from slimloop.model.spec import C3Spec, ConcatSpec, ConvSpec


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(nc: int = 2) -> ModelSpec:
    return yolov5_spec("n", nc=nc, names=tuple(f"c{i}" for i in range(nc)), width_multiple=0.125)


def pruned_spec() -> ModelSpec:
    """A tiny spec with odd widths, as pruning leaves them; depth 0.67 gives C3s of 2 and 4."""
    spec = yolov5_spec("n", nc=3, width_multiple=0.125, depth_multiple=0.67)
    widths = {
        "layers.0": 5,  # stem
        "layers.2.cv1": 7, "layers.2.m.0.cv2": 7, "layers.2.m.1.cv2": 7,  # shortcut: coupled
        "layers.2.m.0.cv1": 13, "layers.2.m.1.cv1": 3, "layers.2.cv2": 21, "layers.2.cv3": 11,
        "layers.4.m.0.cv1": 9, "layers.4.m.1.cv1": 17, "layers.4.m.2.cv1": 1, "layers.4.cv2": 6,
        "layers.9.cv1": 13,  # SPPF hidden
        "layers.13.m.0.cv1": 21, "layers.13.m.0.cv2": 7, "layers.13.m.1.cv2": 19,  # no shortcut
        "layers.17.cv3": 13, "layers.20.cv3": 7, "layers.23.cv3": 21,  # Detect inputs
    }
    return with_conv_widths(spec, widths)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_yolov5n_parameter_count_matches_yolov5():
    model = build_model(yolov5_spec("n", nc=80))
    assert n_params(model) == 1_872_157  # YOLOv5n (v6) as trained, BN separate
    # YOLOv5 reports 1,867,405 after fusing each BN into its conv (2 params per channel -> 1 bias)
    bn_channels = sum(m.bn.num_features for m in conv_modules(model).values())
    assert n_params(model) - bn_channels == 1_867_405
    assert n_params(build_model(yolov5_spec("s", nc=80))) == 7_235_389


def test_materialized_widths_and_depths():
    n = yolov5_spec("n", nc=1)
    chs = n.out_channels()
    assert chs[:10] == (16, 32, 32, 64, 64, 128, 128, 256, 256, 256)
    assert [chs[i] for i in (12, 16, 19, 22)] == [256, 128, 128, 256]  # Concat widths
    assert [len(n.layers[i].bottlenecks) for i in (2, 4, 6, 8, 13, 17, 20, 23)] == [1, 2, 3, 1, 1, 1, 1, 1]
    assert n.layers[0] == ConvSpec((-1,), 16, 6, 2, 2)
    assert n.layers[9].hidden_chs == 128 and n.layers[9].out_chs == 256  # SPPF c_ = c1 // 2
    assert not n.layers[13].shortcut and n.layers[4].shortcut
    m = yolov5_spec("m", nc=1)
    assert [len(m.layers[i].bottlenecks) for i in (2, 4, 6, 8, 13)] == [2, 4, 6, 2, 2]
    assert m.layers[4].hidden_chs == 96 and m.out_channels()[23] == 768
    assert n.detect.strides == (8, 16, 32) and n.detect.src == (17, 20, 23)
    assert n.detect.anchors[0][0] == (10.0, 13.0)


@pytest.mark.parametrize("make", [lambda: yolov5_spec("n", nc=80), pruned_spec])
def test_every_spec_width_is_the_built_width(make):
    spec = make()
    model = build_model(spec)
    convs = conv_modules(model)
    widths = conv_widths(spec)
    assert list(convs) == list(widths)  # same names, same order
    for name, conv in convs.items():
        assert conv.conv.out_channels == widths[name] == conv.bn.num_features, name
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, ConvSpec):
            assert model.layers[i].conv.in_channels == spec.in_channels(i)
    d = spec.detect
    chs = spec.out_channels()
    for k, conv in enumerate(model.detect.m):
        assert conv.in_channels == chs[d.src[k]] and conv.out_channels == 3 * (5 + d.nc)


def test_pruned_spec_keeps_odd_widths():
    spec = pruned_spec()
    c3 = spec.layers[2]
    assert (c3.hidden_chs, c3.skip_chs, c3.out_chs) == (7, 21, 11)
    assert [(b.hidden_chs, b.out_chs) for b in c3.bottlenecks] == [(13, 7), (3, 7)]
    assert [b.hidden_chs for b in spec.layers[4].bottlenecks] == [9, 17, 1, 16]
    model = build_model(spec)
    assert model.layers[2].cv3.conv.in_channels == 7 + 21
    assert model.layers[13].cv3.conv.in_channels == 19 + spec.layers[13].skip_chs
    assert model.layers[3].conv.in_channels == 11


@pytest.mark.parametrize("make", [tiny_spec, pruned_spec])
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_round_trip_loads_state_strictly(make, fmt, tmp_path):
    torch.manual_seed(0)
    spec = make()
    model = build_model(spec).eval()
    text = spec_to_json(spec) if fmt == "json" else spec_to_yaml(spec)
    again = spec_from_json(text) if fmt == "json" else spec_from_yaml(text)
    assert again == spec
    path = save_spec(spec, tmp_path / f"spec.{fmt}")
    assert load_spec(path) == spec
    rebuilt = build_model(load_spec(path)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_yml_extension_and_unknown_extension(tmp_path):
    spec = tiny_spec()
    assert load_spec(save_spec(spec, tmp_path / "a.yml")) == spec
    with pytest.raises(SpecError, match="extension"):
        save_spec(spec, tmp_path / "a.txt")


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_forward_shapes_train_and_eval(hw):
    torch.manual_seed(0)
    spec = pruned_spec()
    model = build_model(spec)
    h, w = hw
    x = torch.rand(2, 3, h, w)
    raw = model.train()(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, h // s, w // s, 8) for s in (8, 16, 32)]
    feats, raw2 = model.forward_features(x)
    assert [f.shape[1] for f in feats] == [13, 7, 21]
    assert [tuple(f.shape[2:]) for f in feats] == [(h // s, w // s) for s in (8, 16, 32)]
    model.eval()
    out = model(x)
    n = 3 * sum((h // s) * (w // s) for s in (8, 16, 32))
    assert out.shape == (2, n, 8)
    assert ((out[..., 4:] >= 0) & (out[..., 4:] <= 1)).all()
    assert [r.shape for r in model.forward_raw(x)] == [r.shape for r in raw]


def test_decode_zero_logits_gives_cell_centres_and_anchors():
    model = build_model(tiny_spec()).eval()
    raw = [torch.zeros(1, 3, 64 // s, 96 // s, 7) for s in (8, 16, 32)]
    out = model.detect.decode(raw)  # sigmoid(0) = 0.5: xy at the cell centre, wh = anchor
    w0 = 96 // 8
    idx = 1 * (64 // 8) * w0 + 2 * w0 + 3  # level 0, anchor 1, row 2, column 3
    torch.testing.assert_close(out[0, idx], torch.tensor([3.5 * 8, 2.5 * 8, 16.0, 30.0, 0.5, 0.5, 0.5]))
    last = out[0, -1]  # level 2, anchor 2, last cell
    torch.testing.assert_close(last[:4], torch.tensor([2.5 * 32, 1.5 * 32, 373.0, 326.0]))


def test_detect_bias_prior():
    model = build_model(yolov5_spec("n", nc=80))
    for conv, s in zip(model.detect.m, (8, 16, 32), strict=True):
        b = conv.bias.detach().view(3, 85)
        bound = 1 / math.sqrt(conv.in_channels)  # torch's default uniform bias init
        assert (b[:, 4] - math.log(8 / (640 / s) ** 2)).abs().max() <= bound
        assert (b[:, 5:] - math.log(0.6 / 79.01)).abs().max() <= bound
    assert "detect.anchors" not in model.state_dict()  # the spec holds anchors
    assert model.detect.anchors.shape == (3, 3, 2) and model.detect.stride.tolist() == [8, 16, 32]


@pytest.mark.parametrize("make", [lambda: yolov5_spec("n", nc=80), lambda: yolov5_spec("s", nc=3), pruned_spec,
                                  tiny_spec])
def test_state_shapes_and_param_count_are_what_build_model_makes(make):
    """The shapes the loader checks and the size the spec bound counts come from the integers alone;
    they must be exactly what the built model has, key by key."""
    from slimloop.model.shapes import param_count, state_shapes

    spec = make()
    model = build_model(spec)
    assert state_shapes(spec) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert param_count(spec) == n_params(model)


def test_spec_sizes_are_bounded_before_anything_is_built():
    from slimloop.model.spec_checks import MAX_PARAMS

    spec = tiny_spec()
    conv = spec.layers[0]
    cases = [
        (dataclasses.replace(conv, kernel=33, padding=16), r"layer 0 \(Conv\): kernel 33 is larger than the limit 31"),
        (dataclasses.replace(conv, stride=64, kernel=31, padding=15), r"stride 64 is larger than the limit 32"),
        (dataclasses.replace(conv, out_chs=16385), r"out_chs 16385 is larger than the limit 16384"),
    ]
    for layer, message in cases:
        with pytest.raises(SpecError, match=message):
            dataclasses.replace(spec, layers=(layer, *spec.layers[1:]))
    with pytest.raises(SpecError, match=r"in_chs 100000 is larger than the limit"):
        dataclasses.replace(spec, in_chs=100_000)
    wide = {"layers.0": 16384, "layers.1": 16384}  # each width allowed, the total (2.4 G) not
    with pytest.raises(SpecError, match=rf"parameters, more than the limit {MAX_PARAMS:,}"):
        with_conv_widths(spec, wide)
    yolov5_spec("x", nc=80)  # the largest YOLOv5 (86 M parameters) stays well inside every bound


def test_shortcut_c3_with_mismatched_bottleneck_raises_naming_layer():
    spec = tiny_spec()
    with pytest.raises(SpecError, match=r"layer 4 \(C3\).*bottleneck 0 has out_chs 13") as info:
        with_conv_widths(spec, {"layers.4.m.0.cv2": 13})
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    c3 = spec.layers[6]
    bad = dataclasses.replace(c3, hidden_chs=c3.hidden_chs + 1)
    with pytest.raises(ValueError, match=r"layer 6 \(C3\)"):
        dataclasses.replace(spec, layers=spec.layers[:6] + (bad,) + spec.layers[7:])
    head = spec.layers[13]  # shortcut=False: bottleneck widths are free
    assert isinstance(head, C3Spec) and not head.shortcut
    with_conv_widths(spec, {"layers.13.m.0.cv2": 13})


def test_routing_and_head_errors():
    spec = tiny_spec()
    layers = list(spec.layers)
    layers[12] = ConcatSpec((-1, 4))  # P4-sized upsample with P3 backbone
    with pytest.raises(SpecError, match=r"layer 12 \(Concat\).*different strides"):
        dataclasses.replace(spec, layers=tuple(layers))
    layers[12] = ConcatSpec((-1, 30))
    with pytest.raises(SpecError, match=r"layer 12 \(Concat\).*earlier layer"):
        dataclasses.replace(spec, layers=tuple(layers))
    with pytest.raises(SpecError, match="strides"):
        dataclasses.replace(spec, detect=dataclasses.replace(spec.detect, strides=(8, 16, 16)))
    with pytest.raises(SpecError, match="names"):
        dataclasses.replace(spec, detect=dataclasses.replace(spec.detect, names=("a",)))
    with pytest.raises(SpecError, match=r"layer 1 \(Conv\).*out_chs must be an int"):
        with_conv_widths(spec, {"layers.1": 12.0})
    with pytest.raises(SpecError, match="no Conv named layers.99"):
        with_conv_widths(spec, {"layers.99": 8})


def test_from_dict_names_the_bad_field():
    data = tiny_spec().to_dict()
    data["layers"][3]["out_chs"] = "13"
    with pytest.raises(SpecError, match=r"layers\[3\]\.out_chs: expected int, got str"):
        ModelSpec.from_dict(data)
    data = tiny_spec().to_dict()
    data["layers"][4]["bottlenecks"][1] = {"hidden_chs": 8}
    with pytest.raises(SpecError, match=r"layers\[4\]\.bottlenecks\[1\]: missing key\(s\) out_chs"):
        ModelSpec.from_dict(data)
    data = tiny_spec().to_dict()
    data["layers"][2]["type"] = "C2f"
    with pytest.raises(SpecError, match=r"layers\[2\]\.type: unknown layer type 'C2f'"):
        ModelSpec.from_dict(data)
    data = tiny_spec().to_dict()
    data["detect"]["colour"] = 1
    with pytest.raises(SpecError, match=r"detect: unknown key\(s\) colour"):
        ModelSpec.from_dict(data)
    data = tiny_spec().to_dict()
    data["layers"][2]["shortcut"] = 1
    with pytest.raises(SpecError, match=r"layers\[2\]\.shortcut: expected bool"):
        ModelSpec.from_dict(data)
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_json("{")


def test_load_spec_reports_file_and_line(tmp_path):
    lines = spec_to_yaml(tiny_spec()).splitlines()
    path = tmp_path / "bad.yaml"
    bad = [i for i, line in enumerate(lines) if line.strip() == "shortcut: true"][0]  # layer 2
    path.write_text("\n".join(lines[:bad] + ["  shortcut: 2"] + lines[bad + 1:]))
    with pytest.raises(SpecError, match=rf"bad.yaml:{bad + 1}: layers\[2\]\.shortcut: expected bool"):
        load_spec(path)
    bad = lines.index("  - {hidden_chs: 16, out_chs: 16}")  # layer 4, bottleneck 0
    path.write_text("\n".join(lines[:bad] + ["  - {hidden_chs: 16, out_chs: 15}"] + lines[bad + 1:]))
    with pytest.raises(SpecError, match=rf"bad.yaml:{bad + 1}: layer 4 \(C3\): shortcut=True"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.json")


def test_onnx_export_dynamic_and_fixed_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(tiny_spec()).eval()
    x = torch.rand(3, 3, 64, 96)
    for dynamic in (True, False):
        path = tmp_path / f"m{dynamic}.onnx"
        axes = {"images": {0: "batch"}, "out": {0: "batch"}} if dynamic else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:1],), str(path), input_names=["images"], output_names=["out"],
                              opset_version=17, dynamic_axes=axes, dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        xb = x if dynamic else x[:1]
        got = sess.run(None, {"images": xb.numpy()})[0]
        np.testing.assert_allclose(got, model(xb).detach().numpy(), rtol=1e-4, atol=1e-3)
