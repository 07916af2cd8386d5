"""`pad.multiple: auto`: the fastest measured multiple within pad.max_growth, the table in the record."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_EVAL, randomize_bn

from slimloop.checkpoint import save_checkpoint
from slimloop.compress.groups import topology
from slimloop.compress.pad import auto_pad_table, choose_multiple, pad_step
from slimloop.compress.prune import gamma_scores, select_channels
from slimloop.compress.steps import save_masks
from slimloop.config import PAD_CANDIDATES, LatencyParams, PadParams, Params
from slimloop.model import build_model, conv_widths


def _candidate(multiple: int, ms: float, within: bool = True) -> dict:
    return {"multiple": multiple, "within_growth": within, "latency": {"onnxruntime": {"median_ms": ms}}}


def test_choice_is_the_fastest_allowed_multiple():
    fake = [_candidate(1, 5.0), _candidate(4, 3.0), _candidate(8, 2.0), _candidate(16, 1.0, within=False),
            _candidate(32, 0.5, within=False)]
    assert choose_multiple(fake, "onnxruntime") == 8  # 16 and 32 are faster but grow too much
    assert choose_multiple([_candidate(1, 2.0), _candidate(8, 2.0), _candidate(4, 2.5)], "onnxruntime") == 1  # tie
    assert choose_multiple([_candidate(1, 9.0), _candidate(32, 1.0, within=False)], "onnxruntime") == 1


@pytest.fixture(scope="module")
def pruned(tiny_spec):
    torch.manual_seed(0)
    model = randomize_bn(build_model(tiny_spec))
    scores = gamma_scores(model, topology(model.spec))
    return model, select_channels(scores, ratio=0.5, min_channels=2), scores


def _fake_timings(ms_by_multiple: dict[int, float], seen: dict):
    """A timing function that records the structures it was given and answers set times."""
    def measure(structures, imgsz, latency):
        seen.update(structures=structures, imgsz=imgsz)
        rows = {m: {"median_ms": ms_by_multiple[m], "iqr_ms": [ms_by_multiple[m]] * 2} for m in structures}
        return {latency.runtime: rows, **{rt: rows for rt in latency.compare}}

    return measure


def test_auto_table_measures_every_candidate_and_respects_max_growth(pruned):
    model, keep, scores = pruned
    seen: dict = {}
    fastest_wide = {1: 5.0, 4: 4.0, 8: 3.0, 16: 2.0, 32: 1.0}  # wider is faster on this fake machine
    table = auto_pad_table(model, keep, scores, 64, PadParams(multiple="auto", max_growth=0.0),
                           LatencyParams(compare=["openvino"]), measure=_fake_timings(fastest_wide, seen))
    assert sorted(seen["structures"]) == list(PAD_CANDIDATES) and seen["imgsz"] == 64
    for m, net in seen["structures"].items():
        before = conv_widths(model.spec)
        assert all(w % m == 0 or w == before[n] for n, w in conv_widths(net.spec).items())
    flops = {c["multiple"]: c["gflops"] for c in table["candidates"]}
    assert flops[1] < flops[8] <= flops[32]  # padding restores channels
    allowed = [c["multiple"] for c in table["candidates"] if c["within_growth"]]
    assert all(c["growth"] <= 1e-6 for c in table["candidates"] if c["within_growth"])
    assert table["chosen"] == max(allowed, key=lambda m: -fastest_wide[m]) and 1 in allowed
    assert set(table["candidates"][0]["latency"]) == {"onnxruntime", "openvino"}
    generous = auto_pad_table(model, keep, scores, 64, PadParams(multiple="auto", max_growth=10.0),
                              LatencyParams(), measure=_fake_timings(fastest_wide, {}))
    assert generous["chosen"] == 32  # everything allowed: the fastest
    slow_wide = auto_pad_table(model, keep, scores, 64, PadParams(multiple="auto", max_growth=10.0),
                               LatencyParams(), measure=_fake_timings({1: 3.0, 4: 1.5, 8: 2.0, 16: 4.0, 32: 5.0}, {}))
    assert slow_wide["chosen"] == 4


def test_pad_step_auto_measures_for_real_and_records_the_table(pruned, tiny_data, tmp_path):
    model, keep, scores = pruned
    ckpt = save_checkpoint(tmp_path / "sparse.safetensors", model, {"step": "sparse"})
    masks = save_masks(tmp_path / "masks.safetensors", keep, scores)
    latency = LatencyParams(pad_rounds=1, pad_runs=2, warmup=0, round_warmup=0, threads=1)
    result = pad_step(ckpt, masks, tiny_data, PadParams(multiple="auto"), TINY_EVAL, tmp_path / "pad", 64,
                      latency=latency, machine={"cpu": "this one"})
    auto = result.record["pad_auto"]
    assert result.record["multiple"] == auto["chosen"] in PAD_CANDIDATES
    assert auto["machine"] == {"cpu": "this one"} and auto["runtime"] == "onnxruntime"
    assert all(c["latency"]["onnxruntime"]["median_ms"] > 0 for c in auto["candidates"])
    assert result.record["gflops"] == pytest.approx(
        next(c["gflops"] for c in auto["candidates"] if c["multiple"] == auto["chosen"]), rel=1e-4)


def test_auto_and_four_are_valid_params_and_explicit_values_keep_working():
    assert Params.model_validate({"pad": {"multiple": "auto", "max_growth": 0.1}}).pad.multiple == "auto"
    assert Params.model_validate({"pad": {"multiple": 4}}).pad.multiple == 4
    with pytest.raises(ValueError):
        Params.model_validate({"pad": {"multiple": 3}})
