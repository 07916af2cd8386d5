"""The training curves' log: dvclive on rank 0, nothing on the other ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_live(out_dir: Path, resume: bool):
    """A dvclive logger that also works in a git repository without commits.

    dvclive asks git for the current revision and raises in a repository with no commits yet (a
    fresh ``git init``); the curves do not need the revision, so logging goes on without it.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class _Live(Live):
        def _init_dvc(self) -> None:
            try:
                super()._init_dvc()
            except SCMError:
                self._dvc_repo, self._dvc_file = None, "dvc.yaml"

    return _Live(str(out_dir / "live"), dvcyaml=None, save_dvc_exp=False, resume=resume, report=None)


class NoLive:
    """The dvclive logger of ranks other than 0: logs nothing."""

    step = 0

    def log_metric(self, *_: Any) -> None:
        pass

    def next_step(self) -> None:
        pass

    def end(self) -> None:
        pass
