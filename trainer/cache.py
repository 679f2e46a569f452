"""`python -m trainer.cache`: list the feature cache's entries, and prune them.

Nothing evicts entries on its own (storage.feature_cache is shared by every run, sweep point
and user of a machine), so this is how it is kept in bounds:

    python -m trainer.cache                          every entry: size, age, kind, name
    python -m trainer.cache prune --max-gb 5         the oldest go until 5 GB are left
    python -m trainer.cache prune --older-than 30    entries written over 30 days ago go

`--cache DIR` (a folder or gs://) names another cache than the config's default,
`${storage.cache_dir}/features`. What an entry is comes from the feature_cache package; claims
(a run computing an entry right now) are listed but never pruned.
"""

from __future__ import annotations

import argparse
import sys
import time

from trainer import ExitCode, TrainerError, feature_cache
from trainer.feature_cache import Entry

GB = 1024**3
DAY = 86400.0


def default_cache() -> str:
    """storage.feature_cache as the schema's default resolves here ($TRAINER_CACHE_DIR)."""
    from omegaconf import OmegaConf

    from trainer.config import Config

    return str(OmegaConf.structured(Config).storage.feature_cache)


def to_prune(
    found: list[Entry], *, max_gb: float | None, older_than_days: float | None, now: float
) -> list[Entry]:
    """The entries of `found` (oldest first) to remove: those written over `older_than_days`
    ago, then the oldest until the rest fit in `max_gb`; never a claim."""
    prunable = [entry for entry in found if entry.kind != "claim"]
    gone = []
    if older_than_days is not None:
        gone = [entry for entry in prunable if now - entry.written > older_than_days * DAY]
    if max_gb is not None:
        left = sum(entry.size for entry in found) - sum(entry.size for entry in gone)
        for entry in prunable:
            if left <= max_gb * GB:
                break
            if entry not in gone:
                gone.append(entry)
                left -= entry.size
    return gone


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < DAY:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY:.1f} d"


def show(cache: str, found: list[Entry], *, now: float) -> None:
    """The entries as a table, oldest first, and their total."""
    total = sum(entry.size for entry in found)
    print(f"{cache}: {len(found)} entries, {_size(total)}")
    for entry in found:
        row = f"{_size(entry.size):>9}  {_age(now - entry.written):>8}  {entry.kind:<13}"
        print(f"{row}  {entry.name}")


def prune(cache: str, gone: list[Entry], *, dry_run: bool) -> None:
    """Remove `gone` from `cache` (only say so with `dry_run`), one line each and a total."""
    for entry in gone:
        if not dry_run:
            feature_cache.remove(cache, entry)
        print(f"{'would remove' if dry_run else 'removed'} {entry.name} ({_size(entry.size)})")
    freed = _size(sum(entry.size for entry in gone))
    done = f"would be removed, {freed} freed" if dry_run else f"removed, {freed} freed"
    print(f"{cache}: {len(gone)} entries {done}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # --cache before or after the command: SUPPRESS keeps a subcommand from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache",
        default=argparse.SUPPRESS,
        help="a cache folder or gs:// prefix (default: storage.feature_cache's default,"
        " ${storage.cache_dir}/features)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m trainer.cache",
        parents=[common],
        description="List the feature cache's entries (size, age, kind, name; oldest first) or"
        " prune them. Nothing else removes entries.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", parents=[common], help="every entry (the default)")
    pruning = commands.add_parser("prune", parents=[common], help="remove old entries")
    pruning.add_argument(
        "--max-gb", type=float, help="remove the oldest until this many GB are left"
    )
    pruning.add_argument(
        "--older-than", type=float, metavar="DAYS", help="remove entries written over DAYS ago"
    )
    pruning.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    args = parser.parse_args(argv)
    if args.command == "prune" and args.max_gb is None and args.older_than is None:
        parser.error("prune: pass --max-gb N, --older-than DAYS or both")
    for flag, value in (("--max-gb", "max_gb"), ("--older-than", "older_than")):
        if getattr(args, value, None) is not None and getattr(args, value) < 0:
            parser.error(f"{flag} {getattr(args, value)}: must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache = getattr(args, "cache", None) or default_cache()
    now = time.time()
    try:
        with feature_cache.cache_errors(cache):  # a folder it cannot read, a bucket it cannot
            found = feature_cache.entries(cache)
            if args.command == "prune":
                gone = to_prune(found, max_gb=args.max_gb, older_than_days=args.older_than, now=now)
                prune(cache, gone, dry_run=args.dry_run)
            else:
                show(cache, found, now=now)
    except TrainerError as error:
        print(f"trainer.cache: error: {error}", file=sys.stderr)
        sys.exit(ExitCode.USER_ERROR)


if __name__ == "__main__":
    main()
