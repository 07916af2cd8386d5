"""The step store ($SLIMLOOP_CACHE or ~/.cache/slimloop/steps): show its size, prune what no
metrics file references and nothing used lately (python -m flows.store size | prune)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.common import run_entry
from slimloop.store.entries import store_dir
from slimloop.store.prune import print_size, prune


def main(argv: list[str] | None = None) -> int:
    # Not flows.common.base_parser: no params are read here, so --params would be a lie in --help.
    parser = argparse.ArgumentParser(prog="python -m flows.store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    size = sub.add_parser("size", help="total size, number of entries and the largest entries")
    size.add_argument("--top", type=int, default=10, help="how many of the largest to list (default: 10)")
    pr = sub.add_parser("prune", help="remove entries no metrics file references and not used lately, "
                                      "orphans and work/")
    pr.add_argument("--keep-days", type=float, default=14.0,
                    help="keep entries used in the last N days even if unreferenced (default: 14)")
    pr.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    pr.add_argument("--metrics-dir", type=Path, nargs="+", action="extend", dest="metrics_dirs",
                    help="folders whose iterations/iter_*.json and final.json reference checkpoints "
                         "to keep (default: metrics)")
    args = parser.parse_args(argv)
    root = store_dir()
    if args.command == "size":
        print_size(root, args.top)
    elif args.keep_days < 0:
        parser.error("--keep-days must be >= 0")
    else:
        prune(root, args.metrics_dirs or [Path("metrics")], args.keep_days, args.dry_run)
    return 0


if __name__ == "__main__":
    run_entry(main)
