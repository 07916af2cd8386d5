"""The side-by-side latency table: round-robin rounds, one number per model, ratios with their spread."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimloop.config import LatencyParams
from slimloop.deploy.latency import cpu_info, lookup, measure_files, time_side_by_side
from slimloop.deploy.runtimes import Runner


class FakeMachine:
    """A clock that advances by each model's cost times a load that drifts from round to round."""

    def __init__(self, costs: dict[str, float]):
        self.now, self.costs, self.calls, self.load = 0.0, costs, [], 1.0

    def clock(self) -> float:
        return self.now

    def runner(self, name: str):
        def run() -> None:
            self.calls.append(name)
            self.load *= 1.001  # the machine gets busier over time: a fixed order would favour the first
            self.now += self.costs[name] * self.load

        return run


def test_rounds_interleave_models_and_rotate_the_start():
    machine = FakeMachine({"a": 1e-3, "b": 2e-3, "c": 3e-3})
    timings = time_side_by_side({n: machine.runner(n) for n in "abc"}, rounds=3, runs=2, warmup=1,
                                round_warmup=1, clock=machine.clock)
    # warm-up: one run each; then per round each model's turn is 1 untimed + 2 timed runs
    turns = [machine.calls[i] for i in range(3, len(machine.calls), 3)]
    assert machine.calls[:3] == ["a", "b", "c"]
    assert turns == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.round_medians_ms) == 3 and len(t.samples_ms) == 6 for t in timings.values())
    assert timings["a"].median_ms < timings["b"].median_ms < timings["c"].median_ms
    assert timings["b"].median_ms == pytest.approx(2.0, rel=0.05)


def _fake_loader(machine: FakeMachine, loaded: list[Path]):
    def load(runtime: str, path: Path, threads: int | None) -> Runner:
        loaded.append(Path(path))
        return Runner(machine.runner(Path(path).stem), lambda x: x, runtime, "FakeProvider", (1, 3, 32, 32))

    return load


def test_table_has_one_number_per_model_and_ratio_spread_from_round_medians(tmp_path):
    files = {}
    for name, content in (("baseline", b"big"), ("final", b"small"), ("other", b"mid")):
        files[name] = tmp_path / f"{name}.onnx"
        files[name].write_bytes(content)
    files["final again"] = files["final"]  # the same file under a second name: measured once
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(b"small")  # identical bytes: the same model
    files["final @ 32"] = copy
    machine = FakeMachine({"baseline": 4e-3, "final": 1e-3, "other": 2e-3, "copy": 1e-3})
    loaded: list[Path] = []
    params = LatencyParams(rounds=4, runs=5, warmup=2, round_warmup=1, threads=1)
    table = measure_files(files, "onnxruntime", params, baseline="baseline",
                          loader=_fake_loader(machine, loaded), clock=machine.clock)
    assert [r["name"] for r in table["rows"]] == list(files)
    assert len(loaded) == 3  # baseline, final (and its copy), other
    rows = lookup(table)
    same = ("median_ms", "iqr_ms", "round_medians_ms", "speedup", "speedup_min", "speedup_max")
    assert all(rows["final"][k] == rows["final again"][k] == rows["final @ 32"][k] for k in same)
    for row in table["rows"]:
        assert len(row["round_medians_ms"]) == 4
        expected = [b / m for b, m in zip(rows["baseline"]["round_medians_ms"], row["round_medians_ms"], strict=True)]
        assert row["speedup_rounds"] == pytest.approx(expected, rel=1e-3)
        assert row["speedup_min"] == pytest.approx(min(expected), rel=1e-3)
        assert row["speedup_max"] == pytest.approx(max(expected), rel=1e-3)
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
        assert row["iqr_ms"][0] <= row["median_ms"] <= row["iqr_ms"][1]
        assert row["round_min_ms"] == min(row["round_medians_ms"])
    assert rows["baseline"]["speedup"] == 1.0
    assert rows["final"]["speedup"] == pytest.approx(4.0, rel=0.05)
    assert table["threads"] == 1 and table["provider"] == "FakeProvider" and table["rounds"] == 4


def test_real_onnx_runtime_table_and_cpu_info(tmp_path, tiny_spec):
    import torch

    from slimloop.deploy.export import export_onnx
    from slimloop.deploy.runtimes import ort_runner
    from slimloop.model import build_model

    torch.manual_seed(0)
    files = {n: export_onnx(build_model(tiny_spec), tmp_path / f"{n}.onnx", s) for n, s in (("big", 96), ("small", 64))}
    params = LatencyParams(rounds=2, runs=3, warmup=1, round_warmup=0, threads=1)
    table = measure_files(files, "onnxruntime", params, baseline="big")
    assert table["provider"] == "CPUExecutionProvider"
    assert all(r["median_ms"] > 0 and len(r["round_medians_ms"]) == 2 for r in table["rows"])
    runner = ort_runner(files["small"], 1)
    assert runner.input_shape == (1, 3, 64, 64) and runner.infer(runner.keep[0]).shape[0] == 1
    info = cpu_info()
    assert info["cpu"] and info["usable_cpus"] >= 1
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu sse4_2 avx2 fma\n")
    assert cpu_info(fake)["cpu"] == "Some CPU @ 2GHz" and cpu_info(fake)["flags"] == ["sse4_2", "avx2", "fma"]
