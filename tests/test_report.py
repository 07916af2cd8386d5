"""The report stage: table rows and formatting, Pareto front, plots, gallery, missing inputs, artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slimloop.config import DataParams, EvalParams, Params, ReportParams
from slimloop.errors import ConfigError
from slimloop.io import OUTPUT_MARKER
from slimloop.report.gallery import plot_gallery, regressions
from slimloop.report.inputs import load_inputs, pareto_front
from slimloop.report.summary import PLOTS, summary_markdown, write_report
from slimloop.report.tables import comparison_rows, significant

ROOT = Path(__file__).resolve().parents[1]
EVAL = EvalParams(op_conf=0.25, op_iou=0.5)


QUICK = 99.0  # every record's quick single reading: the report must never show it


def rec(map50: float, mAP: float, gflops: float, params: int = 1_234_567, latency: float = 10.0,
        imgsz: int = 128, step: str | None = None) -> dict:
    """A metric record as slimloop.measure writes it (``latency`` is what the side-by-side table measures)."""
    return {"step": step, "map50": map50, "map": mAP, "precision": 0.9, "recall": 0.8, "missed": 3,
            "params": params, "size_mb": 1.0, "gflops": gflops, "imgsz": imgsz, "latency_quick_ms": QUICK,
            "latency_torch_quick_ms": QUICK, "threads": 2, "split": "val", "per_class": {}, "_ms": latency}


WIDTHS = {"before": {"layers.0": 16, "layers.1": 32, "layers.2.cv1": 16},
          "pruned": {"layers.0": 11, "layers.1": 20, "layers.2.cv1": 3},
          "padded": {"layers.0": 16, "layers.1": 24, "layers.2.cv1": 8}}
BASELINE = {**rec(0.950, 0.700, 4.2, params=1_765_432, latency=20.0), "device": "cpu", "epochs": 30}
ITER_1 = {"iteration": 1, "final_step": "distilled", "accepted": True, "map_drop": -0.005, "epochs": 12,
          "kept_fraction": 0.6, "checkpoint": "/store/a/best.safetensors", "widths": WIDTHS, "gamma_histogram": [],
          "steps": {"sparse": rec(0.940, 0.690, 4.2, step="sparse"),
                    "pruned": rec(0.800, 0.500, 2.1, step="pruned"),
                    "padded": rec(0.820, 0.520, 2.3, step="padded"),
                    "retrained": rec(0.945, 0.690, 2.3, step="retrained"),
                    "distilled": rec(0.962, 0.705, 2.3, latency=12.5, step="distilled")}}
ITER_2 = {"iteration": 2, "final_step": "retrained", "accepted": False, "map_drop": 0.1, "epochs": 8,
          "kept_fraction": 0.3, "checkpoint": "/store/b/best.safetensors", "widths": WIDTHS, "gamma_histogram": [],
          "steps": {"sparse": rec(0.950, 0.700, 2.3, step="sparse"),
                    "pruned": rec(0.500, 0.300, 1.0, step="pruned"),
                    "padded": rec(0.520, 0.310, 1.1, step="padded"),
                    "retrained": rec(0.700, 0.600, 1.1, step="retrained"),
                    "distilled": None}}
FINAL = {"final_iteration": 1, "reason": "step_floor", "tolerance": 0.01, "tolerance_met": True, "accepted": [1], "iterations_run": 2,
         "checkpoint": "/store/a/best.safetensors", "epochs_to_final": 12, "epochs_total": 20, "map_drop": -0.005,
         "record": ITER_1["steps"]["distilled"], "baseline": BASELINE}
CONTROL = {"enabled": True, **rec(0.931, 0.650, 2.25, params=400_000), "width_multiple": 0.1875,
           "target_gflops": 2.3, "fits": True, "epochs": 42, "checkpoint": "models/control/best.safetensors"}
SWEEP = [{"model": m, **rec(a50, a, g, imgsz=s, latency=lat), "missed_per_class": {}}
         for m, a50, a, g, s, lat in [("baseline", 0.950, 0.700, 4.2, 128, 20.0), ("baseline", 0.900, 0.600, 2.4, 96, 11.0),
                                      ("final", 0.962, 0.705, 2.3, 128, 12.5), ("final", 0.880, 0.590, 1.3, 96, 7.0)]]


def _latency_json(root: Path, final: dict | None, iterations: tuple[dict, ...], control: dict | None) -> dict:
    """metrics/latency.json as the latency stage writes it: measure_files over stand-in files (the same
    model shares one file, as the catalogue makes it) on a fake machine whose costs are the records' ``_ms``."""
    from slimloop.config import LatencyParams
    from slimloop.deploy.latency import measure_files
    from slimloop.deploy.runtimes import Runner

    models = {"baseline": BASELINE, "sweep_baseline_128": BASELINE}
    for it in iterations:
        models.update({f"iter_{it['iteration']}_{s}": r for s, r in it["steps"].items() if r})
    if final is not None:
        models.update(final=final["record"], sweep_final_128=final["record"])
    if control is not None and "map" in control:
        models["control"] = control
    models.update({f"sweep_{r['model']}_{r['imgsz']}": r for r in SWEEP if r["imgsz"] != 128})
    folder = root / "onnx"
    folder.mkdir()
    files, cost = {}, {}
    for key, record in models.items():
        ident = str(id(record))  # the same record object is the same model
        files[key] = folder / f"{ident}.onnx"
        files[key].write_text(ident)
        cost[ident] = record["_ms"] / 1e3
    clock = [0.0]

    def load(runtime, path, threads):
        def run():
            clock[0] += cost[Path(path).stem]
        return Runner(run, lambda x: x, runtime, "CPUExecutionProvider", (1, 3, 128, 128))

    table = measure_files(files, "onnxruntime", LatencyParams(rounds=3, runs=2, warmup=0, threads=2),
                          "baseline", loader=load, clock=lambda: clock[0])
    return {**table, "target": "onnxruntime", "tables": {"onnxruntime": table}, "versions": {"onnxruntime": "1.x"},
            "machine": {"cpu": "Test CPU", "flags": ["avx2"], "cpus": 2, "usable_cpus": 2}}


def write_metrics(root: Path, control: dict | None = CONTROL, final: dict | None = FINAL,
                  iterations: tuple[dict, ...] = (ITER_1, ITER_2), latency: bool = True) -> Path:
    """The metrics folder the earlier stages would leave (2 iterations, a control, a sweep, the latency table)."""
    (root / "iterations").mkdir(parents=True)
    if latency:
        (root / "latency.json").write_text(json.dumps(_latency_json(root, final, iterations, control)))
    (root / "baseline.json").write_text(json.dumps(BASELINE))
    for it in iterations:
        (root / "iterations" / f"iter_{it['iteration']}.json").write_text(json.dumps(it))
    if final is not None:
        (root / "final.json").write_text(json.dumps(final))
    if control is not None:
        (root / "control.json").write_text(json.dumps(control))
    (root / "imgsz_sweep.json").write_text(json.dumps({"rows": SWEEP}))
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_spec) -> Path:
    """Tiny random-weight baseline and final checkpoints where the report stage looks for them."""
    from slimloop.checkpoint import save_checkpoint
    from slimloop.model import build_model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_checkpoint(root / "baseline" / "best.safetensors", build_model(tiny_spec), {"step": "baseline"})
    save_checkpoint(root / "compressed" / "final.safetensors", build_model(tiny_spec), {"step": "final"})
    return root


def checkpoints(models_dir: Path) -> tuple[Path, Path]:
    return models_dir / "baseline" / "best.safetensors", models_dir / "compressed" / "final.safetensors"


def table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not set(line) <= set("|:- ")]


@pytest.fixture(scope="module")
def written(tmp_path_factory, models_dir, tiny_data):
    """One report over the fake metrics, written over a folder that holds a stale file."""
    root = tmp_path_factory.mktemp("report")
    out = root / "reports"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")  # the folder is replaced as a whole: it is slimloop's
    (out / OUTPUT_MARKER).write_text("")
    inputs = load_inputs(write_metrics(root / "metrics"))
    report = write_report(inputs, out, ReportParams(gallery=2, dpi=50), EVAL, tiny_data, checkpoints(models_dir))
    return out, report


def test_summary_rows_in_order_with_formatted_numbers(written):
    out, report = written
    text = (out / "summary.md").read_text()
    assert text == report.markdown
    lines = table_lines(text)
    assert lines[0] == ("| index | model | mAP@0.5 | Δ mAP@0.5 vs baseline | mAP@0.5:0.95 | size MB | "
                        "latency ms (ONNX Runtime CPU): median [IQR] | speed-up vs baseline [round range] | "
                        "GFLOPs | params |")
    models = [line.split(" | ")[1] for line in lines[1:]]
    assert models == ["baseline", "iter 1 pruned", "iter 1 padded", "iter 1 retrained", "iter 1 distilled",
                      "iter 2 pruned (rolled back)", "iter 2 padded (rolled back)", "iter 2 retrained (rolled back)",
                      "final (iteration 1)", "control (width x0.188)",
                      "baseline @ 128", "baseline @ 96", "final @ 128", "final @ 96"]
    assert "| 0 | baseline | 0.950 | +0.000 | 0.700 | 1.00 | 20.00 [20.00-20.00] | 1.00x [1.00-1.00] | 4.20 | 1,765,432 |" in lines
    assert "| 1 | iter 1 pruned | 0.800 | -0.150 | 0.500 | 1.00 | 10.00 [10.00-10.00] | 2.00x [2.00-2.00] | 2.10 | 1,234,567 |" in lines
    assert "| 4 | iter 1 distilled | 0.962 | +0.012 | 0.705 | 1.00 | 12.50 [12.50-12.50] | 1.60x [1.60-1.60] | 2.30 | 1,234,567 |" in lines
    assert "| 8 | final (iteration 1) | 0.962 | +0.012 | 0.705 | 1.00 | 12.50 [12.50-12.50] | 1.60x [1.60-1.60] | 2.30 | 1,234,567 |" in lines
    assert "| 9 | control (width x0.188) | 0.931 | -0.019 | 0.650 | 1.00 | 10.00 [10.00-10.00] | 2.00x [2.00-2.00] | 2.25 | 400,000 |" in lines
    assert "| 13 | final @ 96 | 0.880 | -0.070 | 0.590 | 1.00 | 7.00 [7.00-7.00] | 2.86x [2.86-2.86] | 1.30 | 1,234,567 |" in lines
    assert "step_floor" in text and "**iteration 1**" in text
    assert text.splitlines()[2].startswith("**Final model: 0.548x the baseline's GFLOPs")
    assert "within the tolerance of 0.01" in text.splitlines()[2]
    assert "2 thread(s)" in text and "device `cpu`" in text
    assert "beats it" in text and "(+0.055)" in text  # final 0.705 vs control 0.650
    for name in PLOTS:
        assert f"]({name})" in text
    assert report.table[4]["Δ mAP@0.5 vs baseline"] == "+0.012"


def test_every_png_is_a_valid_image_and_nothing_else_is_written(written):
    out, _ = written
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "summary.md", "latency.csv", *PLOTS])
    for name in PLOTS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
            img.verify()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".reports")]


def test_every_latency_comes_from_the_table_one_number_per_model(written):
    """The final model's three rows (final, its iteration step, its sweep row at the same size) show the
    one number latency.json has for it; no record's quick reading appears anywhere."""
    out, report = written
    table = json.loads((out.parent / "metrics" / "latency.json").read_text())
    final = next(r for r in table["rows"] if r["name"] == "final")
    cells = {line.split(" | ")[1]: line.split(" | ")[6] for line in table_lines(report.markdown)[1:]}
    shown = f"{final['median_ms']:.2f} [{final['iqr_ms'][0]:.2f}-{final['iqr_ms'][1]:.2f}]"
    assert cells["final (iteration 1)"] == cells["iter 1 distilled"] == cells["final @ 128"] == shown
    assert cells["baseline"] == cells["baseline @ 128"]
    assert f"{QUICK:.2f}" not in report.markdown and f"{QUICK:g}" not in (out / "latency.csv").read_text()
    assert "Test CPU" in report.markdown and "3 interleaved rounds of 2 runs" in report.markdown
    csv = (out / "latency.csv").read_text().splitlines()
    assert csv[0].startswith("model,key,kind,map,map50,gflops,latency_ms") and len(csv) > 10


def test_without_a_latency_table_latencies_are_na_and_the_report_says_so(tmp_path):
    inputs = load_inputs(write_metrics(tmp_path / "metrics", latency=False))
    rows = comparison_rows(inputs)
    assert all(r["latency_ms"] is None for r in rows)
    assert "metrics/latency.json` is missing" in summary_markdown(inputs, rows, "")


def test_missing_control_file_gives_a_report_that_says_so(tmp_path):
    inputs = load_inputs(write_metrics(tmp_path / "metrics", control=None))
    assert inputs.control is None
    report = write_report(inputs, tmp_path / "reports", ReportParams(gallery=0, dpi=50), EVAL, tmp_path,
                          (tmp_path / "absent", tmp_path / "absent"))  # gallery 0: no model is loaded
    assert "The control was not run" in report.markdown and "control.json does not exist" in report.markdown
    assert not any(row["kind"] == "control" for row in report.rows)
    assert (tmp_path / "reports" / "gallery.png").exists()


def test_disabled_control_is_said(tmp_path):
    inputs = load_inputs(write_metrics(tmp_path / "metrics", control={"enabled": False}))
    rows = comparison_rows(inputs)
    text = summary_markdown(inputs, rows, "")
    assert inputs.control is None and "The control was not run: `control.enabled` is false." in text
    assert [row["kind"] for row in rows].count("control") == 0


@pytest.mark.parametrize("missing", ["final.json", "baseline.json"])
def test_missing_required_input_names_the_file(tmp_path, missing):
    metrics = write_metrics(tmp_path / "metrics")
    (metrics / missing).unlink()
    with pytest.raises(ConfigError, match=missing):
        load_inputs(metrics)


def test_loop_reference_row_when_the_loop_measured_at_another_size(tmp_path):
    final = {**FINAL, "baseline": {**BASELINE, "imgsz": 96, "map50": 0.9}}
    rows = comparison_rows(load_inputs(write_metrics(tmp_path / "m", final=final)))
    assert rows[1]["model"] == "baseline @ 96 (loop reference)"
    assert rows[1]["delta_map50"] == pytest.approx(-0.05)


def test_pareto_front_on_hand_made_points():
    points = [(4.0, 0.70),  # 0: front (most accurate)
              (2.0, 0.65),  # 1: front
              (2.5, 0.60),  # 2: dominated by 1
              (1.0, 0.40),  # 3: front (cheapest)
              (2.0, 0.62),  # 4: same cost as 1, less accurate
              (3.0, 0.65),  # 5: same accuracy as 1, costlier
              (1.0, 0.40),  # 6: duplicate of 3: only the first is kept
              (5.0, 0.70)]  # 7: dominated by 0
    assert pareto_front(points) == [3, 1, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [0]


@pytest.mark.parametrize("value, text", [(17.5, "17.5"), (3.2, "3.20"), (0.04123, "0.0412"), (1234.5, "1,230"),
                                         (9.996, "10.0"), (0, "0")])
def test_significant_digits(value, text):
    assert significant(value) == text


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {"boxes": np.array(boxes, np.float64).reshape(-1, 4), "scores": np.array(scores), "labels": np.array(labels)}


def test_gallery_keeps_images_where_final_misses_what_baseline_found(tmp_path, tiny_data):
    from slimloop.data.canonical import image_dir, read_split

    samples = read_split(tiny_data, "val").samples
    two = [i for i, s in enumerate(samples) if len(s.boxes) == 2][:2]
    one = [i for i, s in enumerate(samples) if len(s.boxes) == 1][:1]
    assert len(two) == 2 and len(one) == 1, "tiny_data changed: pick other images"

    def found(i: int, keep=slice(None), score: float = 0.9, flip: bool = False) -> dict:
        s = samples[i]
        labels = (1 - s.labels) if flip else s.labels  # the other class of two
        return _dets(s.boxes[keep].tolist(), [score] * len(s.boxes[keep]), labels[keep].tolist())

    baseline = {i + 1: found(i) for i in range(len(samples))}
    final = dict(baseline)
    final[two[0] + 1] = found(two[0], flip=True)  # wrong class: both boxes missed
    final[one[0] + 1] = found(one[0], score=0.2)  # below op_conf (0.25): missed
    final[two[1] + 1] = found(two[1], keep=slice(0, 1))  # finds the first box only
    folder = image_dir(tiny_data, "val")
    items = regressions(samples, folder, baseline, final, EVAL, limit=8)
    by_missed = [two[0], *sorted([one[0], two[1]])]  # most missed first, ties in file order
    assert [item.image.name for item in items] == [samples[i].file_name for i in by_missed]
    assert [len(item.missed) for item in items] == [2, 1, 1]
    by_name = {item.image.name: item for item in items}
    np.testing.assert_allclose(by_name[samples[two[1]].file_name].missed, samples[two[1]].boxes[1:])
    assert len(by_name[samples[two[0]].file_name].final) == 2  # drawn although the class is wrong
    assert len(by_name[samples[one[0]].file_name].final) == 0  # below op_conf: not drawn
    assert [i.image.name for i in regressions(samples, folder, baseline, final, EVAL, limit=2)] == \
        [samples[i].file_name for i in by_missed[:2]]
    assert regressions(samples, folder, baseline, baseline, EVAL, limit=8) == []
    plot_gallery(items, EVAL, tmp_path / "gallery.png", dpi=50)
    with Image.open(tmp_path / "gallery.png") as img:
        img.verify()


def test_publish_artifacts_is_false_outside_a_flow_run():
    from flows.report import publish_artifacts

    assert publish_artifacts([{"model": "baseline"}], "# report") is False


def test_report_flow_fn_writes_the_folder(tmp_path, models_dir, tiny_data):
    from flows.report import report_flow

    params = Params(data=DataParams(out_dir=str(tiny_data)), eval=EVAL, report=ReportParams(gallery=0, dpi=50))
    result = report_flow.fn(params, write_metrics(tmp_path / "metrics"), models_dir, tmp_path / "out")
    assert result["published"] is False and result["rows"] == 14
    assert (tmp_path / "out" / "summary.md").exists()


def test_help_is_truthful():
    out = subprocess.run([sys.executable, "-m", "flows.report", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert out.returncode == 0, out.stderr
    for flag in ("--params", "--quiet", "--metrics-dir", "--models-dir", "--out"):
        assert flag in out.stdout
    assert "Stage `report`" in out.stdout.replace("\n", " ")


def test_gamma_histograms_are_copied_and_shown(tmp_path):
    from PIL import Image

    inputs = load_inputs(write_metrics(tmp_path / "metrics", control=None))
    gammas = []
    for k in (1, 2):
        gammas.append(tmp_path / f"gamma_iter_{k}.png")
        Image.new("RGB", (8, 8), (k, 0, 0)).save(gammas[-1])
    report = write_report(inputs, tmp_path / "reports", ReportParams(gallery=0, dpi=50), EVAL, tmp_path,
                          (tmp_path / "a", tmp_path / "b"), gamma_plots=gammas)
    text = (tmp_path / "reports" / "summary.md").read_text()
    assert "![gamma_iter_1](gamma/gamma_iter_1.png)" in text and "![gamma_iter_2](gamma/gamma_iter_2.png)" in text
    assert (tmp_path / "reports" / "gamma" / "gamma_iter_2.png").read_bytes() == gammas[1].read_bytes()
    assert tmp_path / "reports" / "gamma" / "gamma_iter_1.png" in report.files


def test_final_model_is_named_by_its_out_then_its_store_path(tmp_path):
    inputs = load_inputs(write_metrics(tmp_path / "metrics"))
    text = summary_markdown(inputs, comparison_rows(inputs), "", final_checkpoint=Path("models/compressed/final.safetensors"))
    first = text.splitlines()[4]  # after the title and the headline
    assert first.startswith("The final model is **iteration")
    assert f"`models/compressed/final.safetensors` (a copy of `{inputs.final['checkpoint']}`)" in first


def test_final_retraining_gets_its_row_name_and_sentence(tmp_path):
    again = rec(0.970, 0.720, 2.3, latency=12.5, step="retrain")
    it1 = {**ITER_1, "steps": {**ITER_1["steps"], "final_retrain": again}}
    final = {**FINAL, "record": again, "loop_record": ITER_1["steps"]["distilled"],
             "final_retrain": {"mode": "scratch", "epochs": 42}}
    inputs = load_inputs(write_metrics(tmp_path / "m", final=final, iterations=(it1, ITER_2)))
    rows = comparison_rows(inputs)
    names = [r["model"] for r in rows]
    assert names.index("iter 1 distilled") + 1 == names.index("iter 1 final_retrain") < names.index("iter 2 pruned (rolled back)")
    (last,) = [r for r in rows if r["kind"] == "final"]
    assert last["model"] == "final (iteration 1, scratch 42 epochs)" and last["map"] == 0.720
    text = summary_markdown(inputs, rows, "")
    assert "trained again from random weights (plan C) for 42 epochs" in text
    assert "mAP@0.5:0.95 0.705 at the end of the loop, 0.720 after it" in text


def test_headline_says_when_the_loop_could_not_compress():
    from slimloop.report.summary import headline

    tries = [{"ratio": 0.5, "retention": 0.2, "map": 0.14}, {"ratio": 0.25, "retention": 0.4, "map": 0.28}]
    final = {**FINAL, "final_iteration": 0, "reason": "cannot_compress", "first_attempts": tries,
             "record": BASELINE, "map_drop": 0.0}
    line = headline(final)
    assert line.startswith("**The loop could not compress this model**")
    assert "ratio 0.5 kept 20% (mAP@0.5:0.95 0.140)" in line and "ratio 0.25 kept 40%" in line
    assert "The final model is the baseline, unchanged." in line
    missed = headline({**FINAL, "tolerance_met": False, "map_drop": 0.05})
    assert "more than the tolerance of 0.01 below it" in missed


def test_iteration_lines_say_how_each_cut_was_sized():
    from slimloop.report.summary import iteration_text

    def it(k, **attempt):
        return {"iteration": k, "steps": {"pruned": {}},
                "attempts": [{"ratio": 0.5, "retention": 0.9, "accepted": True, **attempt}]}

    lines = iteration_text([it(1), it(2, landed=True), it(3, landed=True, reached=True, ratio=0.62)]).splitlines()
    assert "landed" not in lines[0] and "reach" not in lines[0]
    assert "(landed on the target)" in lines[1]
    assert "0.62 (more than a step, to reach the target: `compress.reach`) -> 90% accepted" in lines[2]
