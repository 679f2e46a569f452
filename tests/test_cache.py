"""`python -m trainer.cache`: the feature cache's entries a run wrote, listed and pruned."""

from __future__ import annotations

import os
import time

from hydra import compose, initialize_config_dir

from tests.conftest import REPO, SMALL, make_folders, run_module
from trainer.config import register_configs
from trainer.job import run


def _cache_of_a_run(tmp_path) -> tuple:
    """A run (in this process) over fresh folders; its storage.feature_cache and what is there."""
    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=4)
    cache = tmp_path / "features"
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"data.train_dir={train_dir}",
                f"data.test_dir={test_dir}",
                f"output.dir={tmp_path / 'out'}",
                f"storage.feature_cache={cache}",
                "train.epochs=1",
                *SMALL,
            ],
        )
    run(cfg)
    return cache, sorted(p.name for p in cache.iterdir())


def _cache_command(*args: str, cwd):
    result = run_module("trainer.cache", *args, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_cache_command_lists_a_runs_entries_and_prunes_by_age_and_size(
    tmp_path, in_process_run
):
    cache, written = _cache_of_a_run(tmp_path)
    assert sum(name.endswith(".npy") for name in written) == 2  # train and test features
    assert sum(name.startswith("scan-") for name in written) == 1  # the bad-image findings
    claim = cache / "another-run-computing.claim"  # a run at work: never pruned
    claim.write_text("{}")

    listed = _cache_command("--cache", str(cache), cwd=tmp_path)

    assert listed[0].startswith(f"{cache}: 4 entries, ")
    rows = {line.split()[-1]: line for line in listed[1:]}
    assert sorted(rows) == sorted([*written, claim.name])
    assert "features" in rows[written[0]] and "min" in rows[written[0]]  # kind and age

    scan = next(name for name in written if name.startswith("scan-"))
    old = time.time() - 3 * 86400
    os.utime(cache / scan, (old, old))
    pruned = _cache_command("prune", "--older-than", "2", "--cache", str(cache), cwd=tmp_path)

    assert pruned[-1].startswith(f"{cache}: 1 entries removed")
    assert sorted(p.name for p in cache.iterdir()) == sorted({*written, claim.name} - {scan})

    _cache_command("--cache", str(cache), "prune", "--max-gb", "0", cwd=tmp_path)

    assert [p.name for p in cache.iterdir()] == [claim.name]
