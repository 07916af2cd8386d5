"""What orchestration costs: a no-op `dvc repro`, the loop's cached rerun against its cold run, and
the overhead the Prefect engine adds to one task call.

Runs in a temporary copy of the project on the tiny profile (profiles/tiny.yaml), so the numbers
are about orchestration, not training:

    python benchmarks/bench_orchestration.py [--calls 20]

Writes benchmarks/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimloop.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "orchestration.json"
SKIP = ("metrics/", "plots/", "reports/", "models/", "data/prepared", "dvc.lock")


def _copy(dest: Path) -> None:
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in names:
        if not name.startswith(SKIP) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((ROOT / name).read_bytes())
    (dest / "params.yaml").write_bytes((ROOT / "profiles" / "tiny.yaml").read_bytes())


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def pipeline_times(work: Path) -> dict[str, float]:
    """Cold `dvc repro`, a no-op `dvc repro`, and the compress stage forced again with a warm store."""
    _copy(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": f"{work / 'src'}:{work}", "SLIMLOOP_CACHE": str(work / ".store"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg"}
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([*git, "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=work, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    out = {"repro_cold_s": _timed([*dvc, "repro"], work, env)}
    out["repro_noop_s"] = _timed([*dvc, "repro"], work, env)
    # the loop alone, cold (empty store) and warm (every step served), both without a Prefect server
    compress = [sys.executable, "-m", "flows.compress", "--quiet", "--no-prefect"]
    env["SLIMLOOP_CACHE"] = str(work / ".store-cold")
    out["compress_cold_s"] = _timed(compress, work, env)
    out["compress_warm_s"] = _timed(compress, work, env)
    out["warm_over_cold"] = out["compress_warm_s"] / out["compress_cold_s"]
    return out


def prefect_task_overhead(calls: int) -> dict[str, float]:
    """Median seconds per call of a trivial task: through the engine (temporary API) and as ``.fn``."""
    from prefect import flow, task

    @task
    def noop(i: int) -> int:
        return i

    @flow
    def engine(n: int) -> list[float]:
        times = []
        for i in range(n):
            start = time.perf_counter()
            noop(i)
            times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    engine_times = engine(calls)
    first_flow_s = time.perf_counter() - start
    direct = []
    for i in range(calls):
        t0 = time.perf_counter()
        noop.fn(i)
        direct.append(time.perf_counter() - t0)
    return {"task_engine_ms": 1e3 * statistics.median(engine_times), "task_fn_ms": 1e3 * statistics.median(direct),
            "first_flow_call_s (starts the temporary API)": first_flow_s, "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="task calls for the engine overhead")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": platform.machine(), "cpus": os.cpu_count(), **pipeline_times(Path(tmp))}
    result.update(prefect_task_overhead(args.calls))
    write_json_atomic(RESULTS, result)
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
