"""Scheduled runs: deploy.yaml validation, failing steps named, the deployment and its cron on a server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flows.deploy import build_deployment, load_deploy_config, nightly, run_step, trigger

from slimloop.errors import ConfigError
from slimloop.nightly import DeployStep, StepError, has_default_remote, render_report

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _python(code: str) -> list[str]:
    return ["python", "-c", code]


def _config(tmp_path: Path, steps: list[dict], **top) -> Path:
    """A deploy.yaml in ``tmp_path`` whose commands run in ``tmp_path``."""
    cfg = {"name": "test-nightly", "steps": steps, "publish": {"files": ["metrics/final.json"],
                                                               "copy_to": "reports"}, **top}
    return _write(tmp_path / "deploy.yaml", json.dumps(cfg, indent=1))  # JSON is YAML


def test_project_config_is_valid():
    cfg = load_deploy_config(ROOT / "deploy.yaml")
    assert (cfg.cron, cfg.timezone) == ("0 2 * * *", "UTC")
    assert [s.name for s in cfg.steps] == ["pull", "repro", "push"]
    assert [s.run for s in cfg.steps][1] == ["dvc", "repro"]
    assert cfg.steps[0].skip_without_remote and cfg.steps[0].retries > 0


def test_config_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path / "deploy.yaml", (
        "name: nightly\n"
        "cron: '0 25 * * *'\n"
        "timezone: Mars/Olympus\n"
        "steps:\n"
        "  - name: repro\n"
        "    run: dvc repro\n"
        "    retrys: 2\n"
        "schedule: daily\n"))
    with pytest.raises(ConfigError) as info:
        load_deploy_config(path)
    msg = str(info.value)
    assert msg.startswith("invalid deploy config:")
    assert f"{path}:2: cron: " in msg and "Invalid cron string" in msg
    assert f"{path}:3: timezone: " in msg
    assert f"{path}:6: steps.0.run: " in msg and "['dvc', 'repro']" in msg
    assert f"{path}:7: steps.0.retrys: unknown key" in msg
    assert f"{path}:8: schedule: unknown key" in msg


def test_config_rejects_duplicate_steps_and_missing_file(tmp_path):
    path = _config(tmp_path, [{"name": "a", "run": ["true"]}, {"name": "a", "run": ["true"]}])
    with pytest.raises(ConfigError, match="repeated: a"):
        load_deploy_config(path)
    with pytest.raises(ConfigError, match="cannot read deploy config"):
        load_deploy_config(tmp_path / "nope.yaml")


def test_failing_step_names_command_exit_code_and_stderr(tmp_path):
    step = DeployStep(name="boom", run=_python("import sys; print('out'); sys.stderr.write('disk full\\n'); sys.exit(3)"))
    with pytest.raises(StepError) as info:
        run_step.fn(step, str(tmp_path))
    msg = str(info.value)
    assert "step 'boom' failed: `python -c 'import sys;" in msg
    assert "exited with code 3" in msg and str(tmp_path) in msg
    assert msg.endswith("--- last lines of stderr ---\ndisk full")


def test_missing_program_and_timeout_are_step_errors(tmp_path):
    with pytest.raises(StepError, match="command not found: 'no-such-program-xyz'"):
        run_step.fn(DeployStep(name="x", run=["no-such-program-xyz"]), str(tmp_path))
    slow = DeployStep(name="slow", run=_python("import time; time.sleep(30)"), timeout_min=0.01)
    with pytest.raises(StepError, match="timed out after 0.01 min"):
        run_step.fn(slow, str(tmp_path))


def test_python_is_this_interpreter_and_no_prefect_run_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "abc")
    code = "import os, sys; print(sys.executable); assert 'PREFECT__FLOW_RUN_ID' not in os.environ"
    assert run_step.fn(DeployStep(name="py", run=_python(code)), str(tmp_path)) == 0


def test_no_remote_outside_a_dvc_repo(tmp_path):
    assert not has_default_remote(tmp_path)


def test_report_tables(tmp_path):
    (tmp_path / "metrics").mkdir()
    _write(tmp_path / "metrics/final.json", json.dumps(
        {"map": 0.61234, "reason": "target", "record": {"map50": 0.9}, "rows": [{"imgsz": 128, "gflops": 0.5}]}))
    _write(tmp_path / "metrics/iterations.csv", "iteration,step,map\n0,baseline,0.7\n1,pruned,0.6\n")
    md = render_report(["metrics/final.json", "metrics/iterations.csv", "metrics/gone.json"], tmp_path)
    assert "| map | 0.6123 |" in md and "| reason | target |" in md and "| record.map50 | 0.9 |" in md
    assert "| imgsz | gflops |" in md and "| 128 | 0.5 |" in md
    assert "| 1 | pruned | 0.6 |" in md
    assert "## `metrics/gone.json`\nmissing" in md


# ------------------------------------------------------------------- against a Prefect server
def test_deployment_schedule_and_run_now(tmp_path, prefect_server):
    from prefect import get_client

    path = _config(tmp_path, [{"name": "repro", "run": ["dvc", "repro"]}],
                   cron="30 3 * * 1-5", timezone="Europe/Berlin")
    cfg = load_deploy_config(path)
    deployment_id = build_deployment(cfg, path).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("nightly/test-nightly")
        assert deployment.id == deployment_id
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 3 * * 1-5", "Europe/Berlin")
        assert schedule.active
        assert deployment.parameters == {"config": str(path.resolve())}
        assert deployment.entrypoint.endswith("deploy.py:nightly")
        assert deployment.global_concurrency_limit.limit == 1  # one nightly at a time
        run = trigger(cfg)
        stored = client.read_flow_run(run.id)
    assert stored.deployment_id == deployment_id
    assert stored.parameters == {"config": str(path.resolve())}
    assert stored.state is not None and stored.state.is_scheduled()  # no served process in tests


def test_run_now_without_deployment_says_serve_first(tmp_path, prefect_server):
    from flows.deploy import DeployError

    cfg = load_deploy_config(_config(tmp_path, [{"name": "a", "run": ["true"]}], name="never-served"))
    with pytest.raises(DeployError, match="run `python -m flows.deploy serve` first"):
        trigger(cfg)


def test_flow_stops_at_failing_step(tmp_path, prefect_server):
    path = _config(tmp_path, [
        {"name": "first", "run": _python("open('first.txt', 'w').write('1')")},
        {"name": "fails", "run": _python("import sys; sys.stderr.write('no space left\\n'); sys.exit(4)")},
        {"name": "never", "run": _python("open('never.txt', 'w').write('1')")},
    ])
    with pytest.raises(StepError, match=r"(?s)step 'fails' failed: `python -c .*` exited with code 4.*no space left"):
        nightly(config=str(path))
    assert (tmp_path / "first.txt").exists() and not (tmp_path / "never.txt").exists()


def test_flow_retries_skips_and_publishes(tmp_path, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    flaky = ("import pathlib, sys; p = pathlib.Path('tries'); n = int(p.read_text() if p.exists() else 0) + 1; "
             "p.write_text(str(n)); sys.exit(0 if n > 1 else 1)")
    (tmp_path / "metrics").mkdir()
    _write(tmp_path / "metrics/final.json", json.dumps({"map": 0.5}))
    path = _config(tmp_path, [
        {"name": "pull", "run": ["dvc", "pull"], "skip_without_remote": True},
        {"name": "flaky", "run": [sys.executable, "-c", flaky], "retries": 1, "retry_delay_s": 0},
    ])
    assert nightly(config=str(path)) == {"pull": "skipped", "flaky": "ok", "publish": "ok"}
    assert (tmp_path / "tries").read_text() == "2"
    [copy] = list((tmp_path / "reports").iterdir())
    assert json.loads((copy / "metrics/final.json").read_text()) == {"map": 0.5}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["slimloop-nightly"])))
    assert any("| map | 0.5 |" in str(a.data) for a in artifacts)
