"""Scheduled runs: the nightly pipeline (dvc pull, repro, push, publish) as a Prefect deployment
with a cron schedule, served against a running Prefect server (PREFECT_API_URL)."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import MissingContextError
from pydantic import ValidationError, field_validator

from flows.common import run_entry
from slimloop.errors import SlimloopError
from slimloop.io import make_dir
from slimloop.nightly import (
    DeployStep,
    NightlyConfig,
    PublishConfig,
    has_default_remote,
    render_report,
    run_command,
    tail_lines,
    workdir_of,
)
from slimloop.yamlfile import load_yaml_model

DEFAULT_CONFIG = Path("deploy.yaml")
FLOW_NAME = "nightly"


class DeployError(SlimloopError):
    """The deployment cannot be served or triggered (no Prefect server, no such deployment)."""


# ----------------------------------------------------------------------------------- config
def _schedule_error(exc: ValidationError) -> ValueError:
    return ValueError(exc.errors()[0]["msg"].removeprefix("Value error, "))


class DeployConfig(NightlyConfig):
    """All of deploy.yaml, its schedule checked as the Prefect server will check it."""

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


def load_deploy_config(path: str | Path = DEFAULT_CONFIG) -> DeployConfig:
    """Read and validate deploy.yaml.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown or invalid (``file:line``).
    """
    return load_yaml_model(path, DeployConfig, "deploy config", "deploy config")


# ------------------------------------------------------------------------------------- tasks
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
    if out := tail_lines(proc.stdout + proc.stderr):
        logger.info("`%s` done; last lines:\n%s", shlex.join(step.run), out)
    return proc.returncode


# ----------------------------------------------------------------------------------- publish
@task(name="publish", cache_policy=NO_CACHE)
def _publish_comparison(root: Path) -> bool:
    """The report stage's comparison table and summary.md as the `slimloop-comparison` table and
    `slimloop-report` markdown artifacts (skipped, with a warning, when the report is missing)."""
    from flows.report import publish_artifacts
    from slimloop.report.inputs import load_inputs
    from slimloop.report.tables import comparison_rows, format_table

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
        make_dir((dest / name).parent)
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
