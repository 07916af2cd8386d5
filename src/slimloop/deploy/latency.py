"""Side-by-side latency: every model loaded once, warmed up, then timed in interleaved rounds."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimloop.config import LatencyParams
from slimloop.deploy.runtimes import (
    RUNTIME_NAMES,
    Runner,
    default_threads,
    load_runner,
    restore_denormals,
    runtime_versions,
)

Clock = Callable[[], float]
# CPU features that decide which kernels a runtime picks (x86 and ARM names as /proc/cpuinfo spells them)
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "asimdhp", "sve",
             "i8mm", "bf16")


@dataclass(frozen=True)
class Timing:
    """One model's times: the median of each round and every timed run (ms)."""

    round_medians_ms: tuple[float, ...]
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """Median of every timed run."""
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> tuple[float, float]:
        """First and third quartile of every timed run."""
        if len(self.samples_ms) < 2:
            return self.samples_ms[0], self.samples_ms[0]
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[0], q[2]


def _timed(run: Callable[[], Any], runs: int, clock: Clock) -> list[float]:
    times = []
    for _ in range(runs):
        start = clock()
        run()
        times.append((clock() - start) * 1e3)
    return times


def time_side_by_side(runs_by_name: Mapping[str, Callable[[], Any]], rounds: int, runs: int, warmup: int,
                      round_warmup: int = 0, clock: Clock = time.perf_counter) -> dict[str, Timing]:
    """Time every model in round-robin rounds, so drifting machine load hits each alike.

    Each model first gets ``warmup`` untimed runs; then every round gives each model, in turn,
    ``round_warmup`` untimed runs and ``runs`` timed ones. The starting model rotates from round to
    round, so no model is always the one after a given other.

    Args:
        runs_by_name: name -> a callable running one inference.
        rounds: round-robin rounds.
        runs: timed runs per model per round.
        warmup: untimed runs per model before the first round.
        round_warmup: untimed runs at the start of each model's turn.
        clock: seconds (``time.perf_counter``; a test injects its own).

    Returns:
        name -> :class:`Timing`.
    """
    names = list(runs_by_name)
    for name in names:
        for _ in range(warmup):
            runs_by_name[name]()
    rounds_ms: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            for _ in range(round_warmup):
                runs_by_name[name]()
            rounds_ms[name].append(_timed(runs_by_name[name], runs, clock))
    return {n: Timing(tuple(statistics.median(t) for t in rs), tuple(x for t in rs for x in t))
            for n, rs in rounds_ms.items()}


def speedup(model: Timing, baseline: Timing) -> dict[str, float]:
    """Baseline time over model time, per round (both measured in the same round, under the same load).

    Returns:
        ``speedup_rounds`` (baseline round median over the model's, one per round), ``speedup`` (their
        median), ``speedup_min`` and ``speedup_max`` (their range).
    """
    per_round = [b / m for b, m in zip(baseline.round_medians_ms, model.round_medians_ms, strict=True)]
    return {"speedup": statistics.median(per_round), "speedup_rounds": per_round,
            "speedup_min": min(per_round), "speedup_max": max(per_round)}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU model name, the kernel-relevant flags it has, and the CPU counts.

    Read from ``/proc/cpuinfo`` where it exists (Linux, x86 or ARM), else from :mod:`platform`.
    """
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                name = value.strip()
            elif key in ("flags", "features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"cpu": name, "flags": [f for f in CPU_FLAGS if f in flags], "machine": platform.machine(),
            "system": platform.system(), "cpus": os.cpu_count(), "usable_cpus": default_threads()}


def file_digest(path: Path) -> str:
    """sha256 of a file (the same bytes are the same model, measured once)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _model_row(name: str, files: Mapping[str, Path], timing: Timing, base: Timing | None,
               digest: str) -> dict[str, Any]:
    q1, q3 = timing.iqr_ms
    row: dict[str, Any] = {
        "name": name, "onnx": str(files[name]), "sha256": digest, "median_ms": round(timing.median_ms, 4),
        "iqr_ms": [round(q1, 4), round(q3, 4)], "round_medians_ms": [round(t, 4) for t in timing.round_medians_ms],
        "round_min_ms": round(min(timing.round_medians_ms), 4), "round_max_ms": round(max(timing.round_medians_ms), 4)}
    if base is not None:
        ratio = speedup(timing, base)
        row.update(speedup=round(ratio["speedup"], 4), speedup_rounds=[round(v, 4) for v in ratio["speedup_rounds"]],
                   speedup_min=round(ratio["speedup_min"], 4), speedup_max=round(ratio["speedup_max"], 4))
    return row


def measure_files(files: Mapping[str, Path], runtime: str, params: LatencyParams, baseline: str | None = None,
                  loader: Callable[[str, Path, int | None], Runner] = load_runner,
                  clock: Clock = time.perf_counter) -> dict[str, Any]:
    """The side-by-side table of ``files`` on ``runtime``: one row per name, identical files measured once.

    Args:
        files: name -> model file (ONNX, or an OpenVINO ``.xml``), in table order.
        runtime: one of :data:`slimloop.deploy.runtimes.RUNTIMES`.
        params: ``rounds``, ``runs``, ``warmup``, ``round_warmup``, ``threads``.
        baseline: the name the ``speedup`` columns divide by (None: no ratios).
        loader: ``(runtime, path, threads) -> Runner`` (tests inject fakes).
        clock: the clock of :func:`time_side_by_side`.

    Returns:
        ``runtime``, ``runtime_name``, ``provider``, ``threads``, the round settings, ``baseline`` and
        ``rows`` (``name``, ``onnx``, ``median_ms``, ``iqr_ms``, ``round_medians_ms``, ``round_min_ms``,
        ``round_max_ms`` and, with a baseline, ``speedup``, ``speedup_rounds``, ``speedup_min``, ``speedup_max``).
    """
    threads = params.threads or default_threads()
    digests = {n: file_digest(p) for n, p in files.items()}
    unique = list(dict.fromkeys(digests.values()))  # one runner per distinct file, first name's order
    try:
        runners = {d: loader(runtime, files[next(n for n in files if digests[n] == d)], threads) for d in unique}
        timings = time_side_by_side({d: r.run for d, r in runners.items()}, params.rounds, params.runs,
                                    params.warmup, params.round_warmup, clock)
    finally:
        restore_denormals()
    base = timings[digests[baseline]] if baseline is not None else None
    rows = [_model_row(n, files, timings[digests[n]], base, digests[n]) for n in files]
    provider = next(iter(runners.values())).provider if runners else None
    return {"runtime": runtime, "runtime_name": RUNTIME_NAMES.get(runtime, runtime), "provider": provider,
            "threads": threads, "rounds": params.rounds, "runs": params.runs, "warmup": params.warmup,
            "round_warmup": params.round_warmup, "baseline": baseline, "rows": rows}


def latency_table(files: Mapping[str, Path], params: LatencyParams, baseline: str | None = None,
                  per_runtime: Mapping[str, Mapping[str, Path]] | None = None,
                  loader: Callable[[str, Path, int | None], Runner] = load_runner) -> dict[str, Any]:
    """``metrics/latency.json``: the target runtime's table, each ``latency.compare`` runtime's, and the machine.

    Args:
        files: name -> ONNX file.
        params: the latency section.
        baseline: the row the speed-ups divide by.
        per_runtime: runtime -> name -> a file to use there instead (an OpenVINO INT8 IR, say).
        loader: as in :func:`measure_files`.
    """
    tables = {}
    for runtime in (params.runtime, *params.compare):
        chosen = {n: Path((per_runtime or {}).get(runtime, {}).get(n, p)) for n, p in files.items()}
        tables[runtime] = measure_files(chosen, runtime, params, baseline, loader)
    return {"target": params.runtime, "machine": cpu_info(), "versions": runtime_versions(),
            "tables": tables, **tables[params.runtime]}


def lookup(table: Mapping[str, Any], runtime: str | None = None) -> dict[str, dict[str, Any]]:
    """name -> row of a ``latency.json`` table (the target runtime's unless ``runtime`` is given)."""
    source = table["tables"][runtime] if runtime else table
    return {row["name"]: row for row in source.get("rows", [])}


def format_text(table: Mapping[str, Any]) -> str:
    """A plain-text view of one runtime's table: median, IQR, range of round medians, speed-up and its range."""
    lines = [f"{table['runtime_name']} ({table['provider']}), {table['threads']} thread(s), "
             f"{table['rounds']} rounds x {table['runs']} runs, interleaved",
             f"{'model':<28} {'median ms':>10} {'IQR ms':>17} {'rounds ms':>17} {'speed-up':>22}"]
    for row in table["rows"]:
        ratio = (f"{row['speedup']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"
                 if "speedup" in row else "")
        lines.append(f"{row['name']:<28} {row['median_ms']:>10.3f} {row['iqr_ms'][0]:>8.3f}-{row['iqr_ms'][1]:<8.3f} "
                     f"{row['round_min_ms']:>8.3f}-{row['round_max_ms']:<8.3f} {ratio:>22}")
    return "\n".join(lines)


def machine_fingerprint(params: LatencyParams) -> dict[str, Any]:
    """What a measured choice depends on: the CPU and its flags, the usable CPUs, the runtime versions,
    the threads and the runtimes measured (a step keyed by it is served again only on such a machine)."""
    info = cpu_info()
    return {"cpu": info["cpu"], "flags": info["flags"], "machine": info["machine"], "usable_cpus": info["usable_cpus"],
            "versions": runtime_versions(), "threads": params.threads or default_threads(),
            "runtimes": [params.runtime, *params.compare]}
