"""`dvc repro` end to end on the tiny profile, in a temporary git repository.

One module-scoped project runs the whole pipeline once; the tests then check what a user relies
on: a no-op rerun, a report-only change, `dvc metrics diff` between commits, the step cache across
`dvc repro` runs, a killed run that completes when run again, and metrics reproduced on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("metrics/", "plots/", "reports/", "models/", "data/prepared", "dvc.lock")
STAGES = ("prepare", "baseline", "compress", "control", "quantize", "latency", "report")
# what must come out the same when a stage runs again on CPU (latency is a timing, not a result)
STABLE = ("map50", "map", "precision", "recall", "missed", "params", "gflops", "size_mb")

pytestmark = pytest.mark.slow


def _copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if name.startswith(SKIP) or not src.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(src.read_bytes())
    (dest / "params.yaml").write_bytes((ROOT / "profiles" / "tiny.yaml").read_bytes())


class Project:
    """A temporary git + DVC project on the tiny profile, with its own step store."""

    def __init__(self, root: Path, store: Path):
        self.root, self.store = root, store
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONPATH": f"{root / 'src'}:{root}", "SLIMLOOP_CACHE": str(store),
                    "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GIT_AUTHOR_NAME": "t",
                    "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@example.com"}

    def run(self, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def commit(self, message: str) -> str:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)
        return self.run("git", "rev-parse", "HEAD").stdout.strip()

    def set_param(self, section: str, key: str, value) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        params[section][key] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def metrics(self, name: str) -> dict:
        return json.loads((self.root / "metrics" / name).read_text())

    def entries(self) -> set[str]:
        return {p.name for p in self.store.iterdir() if p.is_dir() and p.name not in ("results", "work", "locks")}


def ran(out: subprocess.CompletedProcess) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out.stdout}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server) -> Project:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("repo")
    _copy_project(root)
    proj = Project(root, tmp_path_factory.mktemp("store"))
    proj.env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's server: no start-up per run
    proj.run("git", "init", "-q")
    proj.commit("tiny project")
    started = time.perf_counter()
    out = proj.dvc("repro")
    proj.first_run = out
    proj.first_seconds = time.perf_counter() - started
    proj.first_commit = proj.commit("first run")
    return proj


def test_repro_runs_every_stage_and_writes_every_metric(project):
    assert ran(project.first_run) == set(STAGES)
    for name in ("baseline.json", "final.json", "control.json", "imgsz_sweep.json", "iterations/iter_1.json",
                 "int8.json", "latency.json"):
        assert (project.root / "metrics" / name).is_file(), name
    assert (project.root / "reports" / "summary.md").is_file()
    shown = project.dvc("metrics", "show").stdout
    assert "metrics/baseline.json" in shown and "metrics/control.json" in shown


def test_second_repro_is_a_noop(project):
    started = time.perf_counter()
    out = project.dvc("repro")
    assert ran(out) == set()
    assert time.perf_counter() - started < 30


def test_report_only_change_reruns_only_report(project):
    project.set_param("report", "dpi", 61)
    out = project.dvc("repro")
    assert ran(out) == {"report"}
    project.commit("report dpi")


def test_killed_repro_completes_serves_finished_steps_and_metrics_diff_shows_it(project):
    """Change a loop parameter, kill `dvc repro` as soon as one new step has finished, run it again:
    it completes, the finished step is served from the store, the unchanged sparse step was never
    rerun, and `dvc metrics diff` against the last commit shows the iteration's numbers moving."""
    before = project.entries()
    project.set_param("compress", "step_ratio", 0.5)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project.root, env=project.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if [k for k in project.entries() - before if (project.store / k / "step.json").exists()]:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {k for k in project.entries() - before if (project.store / k / "step.json").exists()}
    assert finished
    stamps = {k: (project.store / k / "step.json").stat().st_mtime_ns for k in finished}
    out = project.dvc("repro")
    assert ran(out) == {"compress", "control", "quantize", "latency", "report"}
    assert all((project.store / k / "step.json").stat().st_mtime_ns == stamps[k] for k in finished)  # served
    new = project.entries() - before
    names = [json.loads((project.store / k / "step.json").read_text())["name"] for k in new]
    # sparse training does not read step_ratio: served from the store; prune onwards ran again
    assert "sparse_train" not in names and "prune" in names
    diff = project.dvc("metrics", "diff", "HEAD", "--all").stdout
    assert "metrics/iterations/iter_1.json" in diff
    project.commit("step ratio 0.5")


def test_push_then_pull_in_another_clone_is_clean_and_repro_does_nothing(project, tmp_path):
    """What a colleague does months later: clone, `dvc pull`, and the pipeline is up to date."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "before push", check=False)  # nothing to commit is fine
    remote = tmp_path / "remote"
    project.dvc("remote", "add", "--local", "-d", "-f", "scratch", str(remote))
    project.dvc("push")
    other = Project(tmp_path / "clone", tmp_path / "other-store")  # no step store of its own yet
    other.env["PREFECT_API_URL"] = project.env["PREFECT_API_URL"]
    project.run("git", "clone", "-q", str(project.root), str(other.root))
    other.dvc("remote", "add", "--local", "-d", "scratch", str(remote))
    other.dvc("pull")
    assert json.loads(other.dvc("status", "--json").stdout) == {}
    started = time.perf_counter()
    assert ran(other.dvc("repro")) == set()
    assert time.perf_counter() - started < 30
    assert other.dvc("metrics", "diff", "--json").stdout.strip() in ("", "{}")
    final = project.root / "models" / "compressed" / "final.safetensors"
    assert (other.root / "models" / "compressed" / "final.safetensors").read_bytes() == final.read_bytes()
    # The pulled lineage seeds the colleague's empty step store: rerunning the loop trains nothing
    # (a trained step leaves its resume state in its entry; imported entries have none).
    other.dvc("repro", "--force", "--single-item", "compress")
    pulled = {p.name for p in (other.root / "models" / "lineage").iterdir() if p.is_dir()}
    assert pulled and pulled <= other.entries() <= project.entries()
    assert not list(other.store.rglob("*.state.safetensors"))
    assert (other.root / "models" / "compressed" / "final.safetensors").read_bytes() == final.read_bytes()
    diff = json.loads(other.dvc("metrics", "diff", "--json").stdout or "{}")
    changed = {f"{name}:{key}" for name, keys in diff.items() for key in keys}
    assert all(key.split(":")[1].startswith("env.") for key in changed), changed  # the run's commit, no result


def test_rerun_on_cpu_reproduces_the_metrics(project):
    """`dvc repro --force` of the loop with an empty step store gives the committed numbers again."""
    committed = project.metrics("final.json")["record"]
    iteration = project.metrics("iterations/iter_1.json")["steps"]
    project.env["SLIMLOOP_CACHE"] = str(project.store.parent / "fresh-store")
    shutil.rmtree(project.root / "models" / "lineage")  # else the loop is served from its entries
    try:
        project.dvc("repro", "--force", "--single-item", "compress")
    finally:
        project.env["SLIMLOOP_CACHE"] = str(project.store)
    again = project.metrics("final.json")["record"]
    assert {k: again[k] for k in STABLE} == {k: committed[k] for k in STABLE}
    steps = project.metrics("iterations/iter_1.json")["steps"]
    for step, rec in iteration.items():
        if rec is not None:
            assert {k: steps[step][k] for k in STABLE} == {k: rec[k] for k in STABLE}, step


def test_two_queued_experiments_run_side_by_side_and_share_the_store(project):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both experiments finish, each with its
    own numbers; the sparse step both need is computed once (it was already in the store); the
    store holds no torn entry and no lock left behind."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "before the queue", check=False)
    before = project.entries()
    for ratio in (0.2, 0.4):
        project.dvc("exp", "run", "--queue", "-S", f"compress.step_ratio={ratio}")
    project.dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = project.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    project.dvc("queue", "stop", "--kill", check=False)
    assert status.count("Success") == 2, status
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    finals = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                ratio = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("compress", {}).get("step_ratio")
                final = data.get("metrics", {}).get("metrics/final.json", {}).get("data", {})
                if ratio in (0.2, 0.4) and final:
                    finals.append((ratio, final["record"]["gflops"]))
    assert sorted(r for r, _ in finals) == [0.2, 0.4] and finals[0][1] != finals[1][1], finals
    new = project.entries() - before
    names = [json.loads((project.store / k / "step.json").read_text())["name"] for k in new]  # none torn
    assert "sparse_train" not in names and names.count("prune") >= 2, names
    locks = project.store / "locks"
    assert not (locks.exists() and list(locks.glob("*"))), "a lock was left behind"
