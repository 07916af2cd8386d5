"""The report's speed sections: how the latency table was measured, each runtime's view, the auto
width multiple's table and the INT8 rows, all from metrics/latency.json, the iteration records and int8.json."""

from __future__ import annotations

from typing import Any

from slimloop.deploy.catalogue import model_key
from slimloop.report.inputs import ReportInputs, is_missing
from slimloop.report.tables import NA, format_latency, format_speedup, format_value, markdown_table


def _frame(header: list[str], cells: list[list[str]]) -> Any:
    import pandas as pd

    return pd.DataFrame(cells, columns=header)


def _latency_cells(row: dict[str, Any] | None) -> list[str]:
    if row is None:
        return [NA, NA]
    fields = {"latency_ms": row.get("median_ms"), "latency_q1_ms": row["iqr_ms"][0], "latency_q3_ms": row["iqr_ms"][1],
              "speedup": row.get("speedup"), "speedup_min": row.get("speedup_min"), "speedup_max": row.get("speedup_max")}
    return [format_latency(fields), format_speedup(fields)]


def measure_text(inputs: ReportInputs) -> str:
    """How the latencies of the report were measured, on what, and how to read them."""
    t = inputs.latency
    if not t:
        return ("No side-by-side latency table (`metrics/latency.json` is missing): every latency is n/a. "
                "Run the `latency` stage (`python -m flows.latency`).")
    m = t.get("machine", {})
    flags = ", ".join(m.get("flags", [])) or "none of the listed flags"
    version = t.get("versions", {}).get(t["runtime"].split("-")[0], NA)
    return (f"Latency: every model below was loaded once, warmed up ({t['warmup']} runs), then timed batch 1 in "
            f"{t['rounds']} interleaved rounds of {t['runs']} runs each (round-robin over the models, in one "
            f"process), on **{t['runtime_name']}** {version} ({t['provider']}, {t['threads']} thread(s)), "
            f"CPU `{m.get('cpu', NA)}` ({flags}; {m.get('usable_cpus', NA)} usable of {m.get('cpus', NA)}). "
            f"The latency is the median of all runs with the interquartile range; the speed-up is the baseline's "
            f"round median over the model's in the same round, the median of the rounds with their range. "
            f"A model that appears in several rows (the final model, its sweep row at the same size) is one file "
            f"measured once. Models were evaluated on device `{inputs.baseline.get('device', NA)}`; mAP comes from "
            f"pycocotools on the `{inputs.baseline.get('split', 'val')}` split. "
            f"Δ mAP@0.5 is against the baseline row (index 0).")


def runtimes_text(inputs: ReportInputs) -> str:
    """Baseline, final model and their INT8 versions on every runtime measured ("" with one runtime)."""
    t = inputs.latency
    if not t or len(t.get("tables", {})) < 2:
        return ""
    keys = ["baseline", "final", model_key("int8", model="baseline"), model_key("int8", model="final")]
    header = ["runtime", *(f"{k} ms [IQR]" for k in keys), "final speed-up [round range]"]
    cells = []
    for table in t["tables"].values():
        rows = {r["name"]: r for r in table["rows"]}
        cells.append([table["runtime_name"], *(_latency_cells(rows.get(k))[0] for k in keys),
                      _latency_cells(rows.get("final"))[1]])
    return "### Every runtime measured\n\n" + markdown_table(_frame(header, cells))


def _pad_auto(inputs: ReportInputs) -> tuple[int, dict[str, Any]] | None:
    k = int(inputs.final.get("final_iteration") or 0)
    its = [it for it in inputs.iterations if it["iteration"] == k] or inputs.iterations[-1:]
    for it in its:
        auto = (it["steps"].get("padded") or {}).get("pad_auto")
        if auto:
            return it["iteration"], auto
    return None


def pad_auto_text(inputs: ReportInputs) -> str:
    """The ``pad.multiple: auto`` table of the final model's structure ("" when the multiple was fixed)."""
    found = _pad_auto(inputs)
    if found is None:
        return ""
    k, auto = found
    runtimes = list(auto["candidates"][0]["latency"])
    header = ["multiple", "GFLOPs", "growth", *(f"{auto['runtime_names'].get(r, r)} ms [IQR]" for r in runtimes),
              "within max_growth", "chosen"]
    cells = []
    for c in auto["candidates"]:
        lat = [_latency_cells({**c["latency"][r], "speedup": None})[0] for r in runtimes]
        cells.append([str(c["multiple"]), format_value(c["gflops"], "sig"), f"{100 * c['growth']:+.1f}%", *lat,
                      "yes" if c["within_growth"] else "no", "**yes**" if c["multiple"] == auto["chosen"] else ""])
    return (f"### Width multiple (`pad.multiple: auto`)\n\nIteration {k}'s pruned structure padded to each "
            f"candidate multiple, measured side by side on {auto['runtime_names'].get(auto['runtime'], auto['runtime'])} "
            f"(CPU `{auto.get('machine', {}).get('cpu', NA)}`); the fastest within `pad.max_growth` = "
            f"{auto['max_growth']:g} of the unpadded GFLOPs was kept: **{auto['chosen']}**.\n\n"
            + markdown_table(_frame(header, cells)))


def int8_text(inputs: ReportInputs) -> str:
    """fp32 against INT8 mAP (both through the runtime) and latency, the tolerance verdict, the worst layers."""
    q = inputs.int8
    if not q:
        return ""
    if not q.get("enabled", True):
        return "### INT8\n\nQuantization is off (`quant.enabled: false`)."
    header = ["model", "mAP@0.5:0.95 fp32 (ORT)", "mAP@0.5:0.95 int8", "Δ", "latency ms fp32 [IQR]",
              "latency ms int8 [IQR]", "int8 speed-up vs baseline fp32"]
    openvino = any("openvino_int8" in e for e in q["models"].values())
    if openvino:
        header.insert(4, "mAP@0.5:0.95 int8 (OpenVINO NNCF)")
    cells = []
    for name, entry in q["models"].items():
        fp32, int8 = entry["fp32"], entry["int8"]
        lat32, lat8 = (_latency_cells(inputs.latency_row(k)) for k in (name, model_key("int8", model=name)))
        row = [name, format_value(fp32["map"], "3"), format_value(int8["map"], "3"),
               format_value(int8["map"] - fp32["map"], "delta"), lat32[0], lat8[0], lat8[1]]
        if openvino:
            row.insert(4, format_value((entry.get("openvino_int8") or {}).get("map"), "3"))
        cells.append(row)
    text = (f"### INT8\n\nONNX Runtime static quantization ({q['format']}, per-channel weights: "
            f"{q['per_channel']}, {q.get('activation_type', 'int8')} activations, {q['calibrate_method']} calibration on {q['calibration_images']} training images); "
            f"mAP of both precisions evaluated through ONNX Runtime with slimloop's own pre- and postprocessing.\n\n"
            + markdown_table(_frame(header, cells)))
    fell_back = [n for n, e in q["models"].items() if e["int8"].get("calibrate_method", q["calibrate_method"]) != q["calibrate_method"]]
    if fell_back:
        text += (f"\n{q['calibrate_method']} calibration could not bin a near-constant tensor of "
                 f"{', '.join(fell_back)}; {'that model was' if len(fell_back) == 1 else 'those models were'} calibrated with minmax.\n")
    if q.get("openvino"):
        text += f"\nOpenVINO: {q['openvino']['note']}\n"
    drop = q.get("final_drop")
    if is_missing(drop):
        return text
    if q["within_tolerance"]:
        return text + (f"\nINT8 costs the final model {drop:+.3f} mAP@0.5:0.95, within `quant.tolerance` "
                       f"{q['tolerance']:g}.\n")
    worst = ", ".join(f"`{w['layer']}` ({w['sqnr_db']:.1f} dB)" for w in q.get("worst_layers", [])) or NA
    return text + (f"\n**INT8 costs the final model {drop:.3f} mAP@0.5:0.95, more than `quant.tolerance` "
                   f"{q['tolerance']:g}.** The layers whose outputs lose most against fp32 on the calibration set "
                   f"(lowest signal-to-quantization-noise ratio): {worst}. Keeping them in fp32 "
                   f"(`nodes_to_exclude`) or calibrating on more images are the usual remedies.\n")
