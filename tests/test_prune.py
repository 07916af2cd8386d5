"""Pruning: global threshold over coupled groups, exact constant folding, pad-up, valid specs."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_bn
from slimloop.checkpoint import load_model, save_checkpoint
from slimloop.compress.groups import topology
from slimloop.compress.pad import pad_channels
from slimloop.compress.prune import gamma_scores, select_channels
from slimloop.compress.sparse import regularize_gammas
from slimloop.compress.surgery import prune_model, recalibrate_bn
from slimloop.deploy.export import check_onnx, export_onnx
from slimloop.model import build_model, yolov5_spec
from slimloop.model.build import conv_modules, conv_widths


def randomized(spec, seed=0):
    """A model in eval mode with random BN statistics, so pruning has real constants to fold."""
    torch.manual_seed(seed)
    return randomize_bn(build_model(spec))


@pytest.fixture(scope="module")
def spec():
    return yolov5_spec("n", nc=2, names=("barcode", "qrcode"), width_multiple=0.25, depth_multiple=0.33)


def test_groups_couple_residual_adds(spec):
    topo = topology(spec)
    group = topo.groups["layers.2.cv1"]  # backbone C3 with shortcut
    assert group.members == ("layers.2.cv1", "layers.2.m.0.cv2")
    assert topo.groups["layers.13.m.0.cv2"].members == ("layers.13.m.0.cv2",)  # neck: no shortcut
    assert topo.inputs["layers.9.cv2"] == ["layers.9.cv1"] * 4  # SPPF
    assert topo.inputs["layers.13.cv1"] == ["layers.10", "layers.6.cv3"]  # concat [-1, 6] after upsample
    assert topo.inputs["detect.m.0"] == ["layers.17.cv3"]


def test_threshold_removes_exactly_the_low_gammas_and_coupled_ones(spec):
    model = randomized(spec)
    convs = conv_modules(model)
    convs["layers.0"].bn.weight.data[[1, 5]] = 0.01
    convs["layers.2.cv1"].bn.weight.data[3] = 0.01
    convs["layers.2.m.0.cv2"].bn.weight.data[3] = 0.02  # both members low: channel 3 goes
    convs["layers.2.m.0.cv2"].bn.weight.data[4] = 0.01  # one member high: channel 4 stays
    keep = select_channels(gamma_scores(model, topology(spec)), threshold=0.1)
    dropped = {g: (~m).nonzero().flatten().tolist() for g, m in keep.items() if (~m).any()}
    assert dropped == {"layers.0": [1, 5], "layers.2.cv1": [3]}
    pruned = prune_model(model, keep)
    widths, before = conv_widths(pruned.spec), conv_widths(spec)
    assert widths["layers.0"] == before["layers.0"] - 2
    assert widths["layers.2.cv1"] == widths["layers.2.m.0.cv2"] == before["layers.2.cv1"] - 1


def test_ratio_is_global_and_min_channels_holds(spec):
    model = randomized(spec)
    conv_modules(model)["layers.1"].bn.weight.data[:] = 0.001  # a whole layer below everything
    scores = gamma_scores(model, topology(spec))
    keep = select_channels(scores, ratio=0.2, min_channels=4)
    assert int(keep["layers.1"].sum()) == 4
    total = sum(m.numel() for m in keep.values())
    kept = sum(int(m.sum()) for m in keep.values())
    assert abs((total - kept) / total - 0.2) < 0.01


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_zero_gamma_channels_prune_without_changing_outputs(spec, ratio):
    model = randomized(spec, seed=1)
    topo = topology(spec)
    keep = select_channels(gamma_scores(model, topo), ratio=ratio, min_channels=2)
    for name, conv in conv_modules(model).items():
        conv.bn.weight.data[~keep[topo.group_of[name]]] = 0.0
    pruned = prune_model(model, keep)
    assert sum(conv_widths(pruned.spec).values()) < sum(conv_widths(spec).values())
    x = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        for a, b in zip(model.forward_raw(x), pruned.forward_raw(x), strict=True):
            h, w = a.shape[2] // 4, a.shape[3] // 4  # away from zero-padded borders
            assert torch.allclose(a[:, :, h:-h, w:-w], b[:, :, h:-h, w:-w], atol=1e-4)


def test_without_folding_outputs_would_change(spec):
    """The folding is what makes the test above pass: dropping constants alone changes outputs."""
    model = randomized(spec, seed=1)
    topo = topology(spec)
    keep = select_channels(gamma_scores(model, topo), ratio=0.3, min_channels=2)
    for name, conv in conv_modules(model).items():
        conv.bn.weight.data[~keep[topo.group_of[name]]] = 0.0
    naive = copy.deepcopy(model)
    for conv in conv_modules(naive).values():
        zero = conv.bn.weight.data == 0
        conv.bn.bias.data[zero] = -50.0  # SiLU(-50) ~ 0: what plain removal assumes
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        diff = (model.forward_raw(x)[0] - naive.forward_raw(x)[0]).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_pad_rounds_up_with_real_channels(spec, multiple):
    model = randomized(spec, seed=2)
    topo = topology(spec)
    scores = gamma_scores(model, topo)
    keep = select_channels(scores, ratio=0.4, min_channels=1)
    padded = pad_channels(keep, scores, multiple)
    for g, mask in padded.items():
        n, before, width = int(mask.sum()), int(keep[g].sum()), mask.numel()
        assert n >= before and (mask | keep[g]).equal(mask)  # never drops a kept channel
        assert n % multiple == 0 or n == width
        restored = mask & ~keep[g]
        if restored.any() and (~mask).any():  # restored ones are the best of the pruned ones
            assert scores[g][restored].min() >= scores[g][~mask].max()
    if multiple == 1:
        assert all(padded[g].equal(keep[g]) for g in keep)


def test_pruned_and_padded_specs_build_load_run_and_export(spec, tmp_path):
    model = randomized(spec, seed=3)
    topo = topology(spec)
    scores = gamma_scores(model, topo)
    for i, keep in enumerate([select_channels(scores, ratio=0.45, min_channels=1)]):
        for multiple in (1, 8):
            pruned = prune_model(model, pad_channels(keep, scores, multiple))
            path = save_checkpoint(tmp_path / f"p{i}{multiple}.safetensors", pruned)
            loaded = load_model(path).eval()
            assert loaded.spec == pruned.spec
            out = loaded(torch.rand(1, 3, 64, 64))
            assert out.shape[-1] == 7
            onnx_path = export_onnx(loaded, tmp_path / f"p{i}{multiple}.onnx", 64)
            assert check_onnx(loaded, onnx_path, 64) <= 1e-3
            if multiple == 8:
                assert all(w % 8 == 0 for w in conv_widths(loaded.spec).values())


def test_regularize_adds_sign_of_gamma(spec):
    model = randomized(spec)
    convs = conv_modules(model)
    for conv in convs.values():
        conv.bn.weight.grad = torch.zeros_like(conv.bn.weight)
    convs["layers.0"].bn.weight.data[0] = -0.5
    l1 = regularize_gammas(model, 1e-2)
    g = convs["layers.0"].bn.weight.grad
    assert g[0].item() == pytest.approx(-1e-2) and g[1].item() == pytest.approx(1e-2)
    assert l1 == pytest.approx(sum(float(c.bn.weight.detach().abs().sum()) for c in convs.values()))


def test_recalibration_sets_bn_statistics_from_the_images_and_touches_nothing_else(tiny_spec, tiny_data):
    from slimloop.data.dataset import DetectionDataset

    model = randomized(tiny_spec)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    first = conv_modules(model)["layers.0"]
    momentum = first.bn.momentum
    assert recalibrate_bn(model, tiny_data, 128, 0) is model and first.bn.running_mean.abs().sum() > 0
    stale = first.bn.running_mean.clone()
    recalibrate_bn(model, tiny_data, 128, images=4, batch_size=3)  # a full batch and a partial one
    assert first.bn.num_batches_tracked == 2 and not torch.allclose(first.bn.running_mean, stale)
    recalibrate_bn(model, tiny_data, 128, images=8, batch_size=8)  # all 8 images in one batch
    images = torch.stack([DetectionDataset(tiny_data, "train", 128, None)[i][0] for i in range(8)]).float() / 255
    with torch.no_grad():
        out = first.conv(images)  # (8, C, 64, 64)
    assert first.bn.num_batches_tracked == 1
    assert torch.allclose(first.bn.running_mean, out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.bn.running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not model.training and first.bn.momentum == momentum
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_criteria_rank_channels_differently_and_random_is_seeded(tiny_spec):
    from slimloop.compress.prune import channel_scores, filter_l1_scores

    model = randomize_bn(build_model(tiny_spec))
    topo = topology(model.spec)
    gamma, l1 = channel_scores(model, topo, "gamma"), channel_scores(model, topo, "l1")
    assert set(gamma) == set(l1) and all(gamma[g].shape == l1[g].shape for g in gamma)
    name = next(iter(topo.groups))
    conv = conv_modules(model)[topo.groups[name].members[0]].conv
    assert torch.allclose(filter_l1_scores(model, topo)[name], conv.weight.detach().abs().mean((1, 2, 3))) \
        or len(topo.groups[name].members) > 1
    r1, r2 = channel_scores(model, topo, "random", seed=3), channel_scores(model, topo, "random", seed=3)
    assert all(torch.equal(r1[g], r2[g]) for g in r1)
    assert not all(torch.equal(r1[g], channel_scores(model, topo, "random", seed=4)[g]) for g in r1)
