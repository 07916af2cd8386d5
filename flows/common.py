"""Shared plumbing for the entry points: offline defaults, argument parsing, clean errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from slimloop.offline import OFFLINE_ENV


def offline_defaults() -> None:
    """Turn telemetry off unless the user set these variables themselves."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every entry point shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_entry(main: Callable[[], int | None]) -> None:
    """Run ``main`` and turn the project's errors into a message and exit code 1, not a traceback."""
    from slimloop.errors import SlimloopError

    offline_defaults()
    try:
        code = main()
    except SlimloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
