"""The nightly run without Prefect: deploy.yaml's models, running its commands (no shell, a
named error with the output's tail on failure) and the markdown summary of the report files."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from slimloop.config import StrictModel
from slimloop.errors import SlimloopError
from slimloop.io import load_json_text
from slimloop.offline import OFFLINE_ENV

TAIL_LINES = 20
ARTIFACT_ROWS = 50
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


class StepError(SlimloopError):
    """A step's command failed: the message names the command, its exit code and its stderr tail."""


# ----------------------------------------------------------------------------------- config
class DeployStep(StrictModel):
    """One command of the nightly run."""

    name: str = Field(pattern=NAME_PATTERN, description="task name in the Prefect UI")
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


class NightlyConfig(StrictModel):
    """All of deploy.yaml; ``cron`` and ``timezone`` are checked by ``flows.deploy.DeployConfig``
    against Prefect's own schedule model (the library does not import Prefect)."""

    name: str = Field("nightly", pattern=NAME_PATTERN, description="deployment name")
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    workdir: str = Field(".", description="where the commands run, relative to the config file")
    steps: list[DeployStep] = Field(min_length=1)
    publish: PublishConfig | None = PublishConfig()

    @model_validator(mode="after")
    def _unique_steps(self) -> NightlyConfig:
        names = [s.name for s in self.steps]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"step names must be unique, repeated: {', '.join(dupes)}")
        return self


def workdir_of(cfg: NightlyConfig, config_path: str | Path) -> Path:
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


def tail_lines(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
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
        tail = tail_lines(text) or "(no output)"
        raise StepError(f"step {step.name!r} failed: `{shown}` exited with code {proc.returncode} in "
                        f"{workdir}\n--- last lines of {stream} ---\n{tail}")
    return proc


def has_default_remote(workdir: Path) -> bool:
    """Whether ``dvc remote default`` names a remote in ``workdir``."""
    env = command_env()
    proc = subprocess.run(resolve_argv(["dvc", "remote", "default"], env), cwd=workdir, env=env,
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and bool(proc.stdout.strip())


# ----------------------------------------------------------------------------------- summary
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
                lines += _json_markdown(load_json_text(path.read_text(encoding="utf-8")))
            except ValueError as exc:
                lines.append(f"not valid JSON: {exc}")
        elif path.suffix == ".csv":
            rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
            lines += _table(rows[0], rows[1:]) if rows else ["(empty)"]
        else:
            lines.append(f"{path.stat().st_size:,} bytes")
        lines.append("")
    return "\n".join(lines)
