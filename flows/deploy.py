"""Scheduled runs: the nightly pipeline (dvc pull, repro, push, publish) as a Prefect deployment
with a cron schedule, served against a running Prefect server (PREFECT_API_URL)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import MissingContextError
from pydantic import Field, ValidationError, field_validator, model_validator

from flows.common import OFFLINE_ENV, run_entry
from slimloop.config import StrictModel
from slimloop.errors import SlimloopError
from slimloop.yamlfile import load_yaml_model

DEFAULT_CONFIG = Path("deploy.yaml")
FLOW_NAME = "nightly"
TAIL_LINES = 20
ARTIFACT_ROWS = 50
_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class StepError(SlimloopError):
    """A step's command failed: the message names the command, its exit code and its stderr tail."""


class DeployError(SlimloopError):
    """The deployment cannot be served or triggered (no Prefect server, no such deployment)."""


# ----------------------------------------------------------------------------------- config
def _schedule_error(exc: ValidationError) -> ValueError:
    return ValueError(exc.errors()[0]["msg"].removeprefix("Value error, "))


class DeployStep(StrictModel):
    """One command of the nightly run."""

    name: str = Field(pattern=_NAME, description="task name in the Prefect UI")
    run: list[str] = Field(min_length=1, description="argument list; `python` is this interpreter")
    retries: int = Field(0, ge=0, le=10, description="extra attempts after a failure")
    retry_delay_s: float = Field(30.0, ge=0, le=3600)
    timeout_min: float | None = Field(None, gt=0, description="kill the command after this long")
    skip_without_remote: bool = Field(False, description="skip when no default DVC remote is set")

    @field_validator("run", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"must be a list of arguments, not a shell string: write {shlex.split(value)!r}")
        return value


class PublishConfig(StrictModel):
    """The report artifacts published after the steps."""

    artifact_key: str = Field("slimloop-nightly", pattern=r"^[a-z0-9-]+$")
    files: list[str] = ["metrics/final.json", "metrics/baseline.json", "metrics/iterations.csv"]
    copy_to: str | None = Field(None, description="also copy the files to <copy_to>/<timestamp>/")


class DeployConfig(StrictModel):
    """All of deploy.yaml."""

    name: str = Field("nightly", pattern=_NAME, description="deployment name")
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    workdir: str = Field(".", description="where the commands run, relative to the config file")
    steps: list[DeployStep] = Field(min_length=1)
    publish: PublishConfig | None = PublishConfig()

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:  # Prefect's own check, so what passes here the server accepts
            CronSchedule(cron=value)
        except ValidationError as exc:
            raise _schedule_error(exc) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            CronSchedule(cron="0 0 * * *", timezone=value)
        except ValidationError as exc:
            raise _schedule_error(exc) from None
        return value

    @model_validator(mode="after")
    def _unique_steps(self) -> DeployConfig:
        names = [s.name for s in self.steps]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"step names must be unique, repeated: {', '.join(dupes)}")
        return self


def load_deploy_config(path: str | Path = DEFAULT_CONFIG) -> DeployConfig:
    """Read and validate deploy.yaml.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown or invalid (``file:line``).
    """
    return load_yaml_model(path, DeployConfig, "deploy config", "deploy config")


def workdir_of(cfg: DeployConfig, config_path: str | Path) -> Path:
    """The folder the commands run in: ``cfg.workdir`` relative to the config file's folder."""
    return (Path(config_path).resolve().parent / cfg.workdir).resolve()


# ---------------------------------------------------------------------------------- commands
def command_env() -> dict[str, str]:
    """Environment for the commands: ours, telemetry off, this interpreter's folder first on PATH.

    ``PREFECT__*`` variables describe the served run itself (its id, the runner's control port) and
    would confuse a Prefect flow started by a command (``dvc repro`` runs ``python -m flows.*``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def resolve_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """``argv`` with its program made absolute; ``python`` is the interpreter running this flow."""
    program = sys.executable if argv[0] in ("python", "python3") else shutil.which(argv[0], path=env["PATH"])
    if program is None:
        raise StepError(f"command not found: {argv[0]!r} (PATH={env['PATH']})")
    return [program, *argv[1:]]


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_command(step: DeployStep, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``step.run`` in ``workdir`` (an argument list, no shell).

    Raises:
        StepError: the program is missing, timed out or exited non-zero; names the command.
    """
    env = command_env()
    shown = shlex.join(step.run)
    timeout = step.timeout_min * 60 if step.timeout_min else None
    try:
        proc = subprocess.run(resolve_argv(step.run, env), cwd=workdir, env=env, capture_output=True,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StepError(f"step {step.name!r} failed: `{shown}` timed out after {step.timeout_min} min "
                        f"in {workdir}") from None
    except OSError as exc:
        raise StepError(f"step {step.name!r} failed: `{shown}` could not start: {exc}") from None
    if proc.returncode != 0:
        stream, text = ("stderr", proc.stderr) if proc.stderr.strip() else ("stdout", proc.stdout)
        tail = _tail(text) or "(no output)"
        raise StepError(f"step {step.name!r} failed: `{shown}` exited with code {proc.returncode} in "
                        f"{workdir}\n--- last lines of {stream} ---\n{tail}")
    return proc


def has_default_remote(workdir: Path) -> bool:
    """Whether ``dvc remote default`` names a remote in ``workdir``."""
    env = command_env()
    proc = subprocess.run(resolve_argv(["dvc", "remote", "default"], env), cwd=workdir, env=env,
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (shown in the Prefect UI), or a plain one when a test calls ``.fn``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="command", cache_policy=NO_CACHE)
def run_step(step: DeployStep, workdir: str) -> int:
    """Task: run one step's command, log the tail of its output; returns its exit code (0)."""
    logger = _logger()
    logger.info("running `%s` in %s", shlex.join(step.run), workdir)
    proc = run_command(step, Path(workdir))
    if out := _tail(proc.stdout + proc.stderr):
        logger.info("`%s` done; last lines:\n%s", shlex.join(step.run), out)
    return proc.returncode


# ----------------------------------------------------------------------------------- publish
def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[:ARTIFACT_ROWS]]
    if len(rows) > ARTIFACT_ROWS:
        lines.append(f"\n({len(rows) - ARTIFACT_ROWS} more rows)")
    return lines


def _flat(obj: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Scalar leaves of nested dicts as ``("record.map", 0.61)``; lists are left out."""
    for key, value in obj.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, str | int | float | bool):
            yield f"{prefix}{key}", value


def _json_markdown(obj: Any) -> list[str]:
    """Scalar values (nested keys dotted) as a key/value table; lists of objects as tables."""
    if not isinstance(obj, dict):
        return ["```", json.dumps(obj)[:2000], "```"]
    scalars = [list(kv) for kv in _flat(obj)]
    lines = _table(["key", "value"], scalars) if scalars else []
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            cols = [c for c, v in value[0].items() if not isinstance(v, dict | list)]
            lines += ["", f"**{key}**", "", *_table(cols, [[r.get(c, "") for c in cols] for r in value])]
    return lines


def render_report(files: list[str], workdir: Path) -> str:
    """Markdown summary of the report files (JSON and CSV as tables, others by size)."""
    lines = [f"# slimloop nightly, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", ""]
    for name in files:
        path = workdir / name
        lines.append(f"## `{name}`")
        if not path.is_file():
            lines += ["missing", ""]
            continue
        if path.suffix == ".json":
            try:
                lines += _json_markdown(json.loads(path.read_text(encoding="utf-8")))
            except ValueError as exc:
                lines.append(f"not valid JSON: {exc}")
        elif path.suffix == ".csv":
            rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
            lines += _table(rows[0], rows[1:]) if rows else ["(empty)"]
        else:
            lines.append(f"{path.stat().st_size:,} bytes")
        lines.append("")
    return "\n".join(lines)


@task(name="publish", cache_policy=NO_CACHE)
def _publish_comparison(root: Path) -> bool:
    """The report stage's comparison table and summary.md as the `slimloop-comparison` table and
    `slimloop-report` markdown artifacts (skipped, with a warning, when the report is missing)."""
    from flows.report import publish_artifacts
    from slimloop.report import comparison_rows, format_table, load_inputs

    summary = root / "reports" / "summary.md"
    if not summary.is_file() or not (root / "metrics" / "final.json").is_file():
        _logger().warning("no report in %s: the comparison artifacts are not published", root)
        return False
    table = format_table(comparison_rows(load_inputs(root / "metrics"))).to_dict("records")
    return publish_artifacts(table, summary.read_text())


def publish_report(publish: PublishConfig, workdir: str) -> str | None:
    """Task: the report files as one markdown artifact (and a dated copy); returns the copy folder."""
    from prefect.artifacts import create_markdown_artifact

    root = Path(workdir)
    missing = [f for f in publish.files if not (root / f).is_file()]
    if missing:
        _logger().warning("report files missing: %s", ", ".join(missing))
    create_markdown_artifact(markdown=render_report(publish.files, root), key=publish.artifact_key,
                             description="slimloop nightly report")
    _publish_comparison(root)
    if publish.copy_to is None:
        return None
    dest = root / publish.copy_to / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    for name in set(publish.files) - set(missing):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    return str(dest)


# -------------------------------------------------------------------------------------- flow
@flow(name=FLOW_NAME, log_prints=True)
def nightly(config: str = str(DEFAULT_CONFIG)) -> dict[str, str]:
    """Run deploy.yaml's steps in order, then publish the report; the first failure fails the run.

    The config is read at run time, so edited steps apply to the next run without serving again
    (a new cron or timezone needs ``serve`` again).

    Returns:
        Step name -> ``"ok"`` or ``"skipped"`` (and ``publish`` -> ``"ok"``).
    """
    cfg = load_deploy_config(config)
    workdir = workdir_of(cfg, config)
    done: dict[str, str] = {}
    for step in cfg.steps:
        if step.skip_without_remote and not has_default_remote(workdir):
            print(f"skipped {step.name}: no default DVC remote in {workdir}")
            done[step.name] = "skipped"
            continue
        runner = run_step.with_options(name=step.name, retries=step.retries,
                                       retry_delay_seconds=step.retry_delay_s)
        runner(step, str(workdir))
        done[step.name] = "ok"
    if cfg.publish is not None:
        publish_report(cfg.publish, str(workdir))
        done["publish"] = "ok"
    return done


def build_deployment(cfg: DeployConfig, config_path: str | Path):
    """The deployment ``nightly/<cfg.name>``: cron schedule in ``cfg.timezone``, one run at a time."""
    from prefect.schedules import Cron

    return nightly.to_deployment(
        name=cfg.name, schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
        parameters={"config": str(Path(config_path).resolve())}, concurrency_limit=1,
        description="slimloop scheduled run: " + ", ".join(
            [s.name for s in cfg.steps] + (["publish"] if cfg.publish else [])),
        tags=["slimloop"])


def trigger(cfg: DeployConfig):
    """Create one run of the deployment now (returns at once, the served process executes it)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        return run_deployment(f"{FLOW_NAME}/{cfg.name}", timeout=0, as_subflow=False)
    except ObjectNotFound:
        raise DeployError(f"no deployment {FLOW_NAME}/{cfg.name} on the server: "
                          "run `python -m flows.deploy serve` first") from None


def require_server() -> str:
    """The Prefect API URL; a schedule on the temporary server that starts without one never fires."""
    from prefect import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeployError("PREFECT_API_URL is not set: start a server with `prefect server start` and "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        if (exc := client.api_healthcheck()) is not None:
            raise DeployError(f"no Prefect server answers at {url}: {exc}")
    return url


# --------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    # Not flows.common.base_parser: its --params would do nothing here (the steps read
    # params.yaml themselves), and --help should not offer it.
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__)
    parser.add_argument("command", choices=["serve", "run-now"],
                        help="serve: register the deployment with its cron schedule and run it when "
                             "due (blocks; Ctrl-C pauses the schedule); run-now: trigger one run of "
                             "the served deployment now")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="deployment config (default: deploy.yaml)")
    args = parser.parse_args(argv)
    cfg = load_deploy_config(args.config)
    url = require_server()
    if args.command == "run-now":
        run = trigger(cfg)
        print(f"triggered {run.name} ({run.id}) of {FLOW_NAME}/{cfg.name} on {url}: "
              f"{run.state_name}; the `serve` process runs it")
        return 0
    from prefect import serve

    print(f"serving {FLOW_NAME}/{cfg.name}: cron {cfg.cron!r} ({cfg.timezone}), steps "
          f"{', '.join(s.name for s in cfg.steps)} in {workdir_of(cfg, args.config)}")
    serve(build_deployment(cfg, args.config), print_starting_message=False)
    return 0


if __name__ == "__main__":
    run_entry(main)
