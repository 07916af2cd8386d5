"""The project's own exception types: every user-facing failure is one of these."""

from __future__ import annotations

from dataclasses import dataclass


class SlimloopError(Exception):
    """Base class for errors a user can act on (bad data, bad params, bad checkpoint)."""


class ConfigError(SlimloopError):
    """params.yaml (or a flow parameter) is invalid; the message names the key."""


class OutputPathError(ConfigError):
    """An output path slimloop must not write or replace (a user's folder, a file, a link, the project)."""


class CheckpointError(SlimloopError):
    """A checkpoint file is missing, corrupt, or does not match the expected spec."""


class UnsafePickleError(CheckpointError):
    """A pickled checkpoint names a global that loading must not call; nothing in it was run."""

    def __init__(self, source: str, global_name: str):
        self.source, self.global_name = source, global_name
        super().__init__(
            f"{source}: refused: the pickle calls {global_name}, which is neither a tensor, a plain "
            "container nor a model class; nothing in the file was run (a checkpoint that runs code "
            "when loaded is either broken or an attack)")


class UnsupportedModelError(CheckpointError):
    """An imported model has a module (or a setting) slimloop cannot represent; names it and its row."""


class TrainingError(SlimloopError):
    """Training cannot continue (for example a non-finite loss); names the epoch and step."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: where it is and what is wrong."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class DataError(SlimloopError):
    """A dataset has problems; ``problems`` lists every one with file and line."""

    def __init__(self, problems: list[Problem] | Problem | str, header: str = "invalid dataset"):
        if isinstance(problems, str):
            problems = [Problem(file="<dataset>", line=None, message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:200])
        more = len(self.problems) - 200
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{header}: {len(self.problems)} problem(s)\n{shown}{tail}")
