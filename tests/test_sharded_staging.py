"""Sharded staging: with several workers on cached features, each worker downloads only the
images it decodes (trainer.data.owner), and the run still equals the one-worker run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import corrupt_files, free_ports
from tests.test_distribute import _finish, _serve, _tf_config, _trainer
from tests.test_fast import all_stopped

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures


def _staged(cache_dir: Path) -> set[str]:
    """The images a worker downloaded, by their name under the bucket."""
    staged = set()
    for path in cache_dir.rglob("*"):
        parts = path.relative_to(cache_dir).parts
        if path.is_file() and "inputs" in parts:
            staged.add("/".join(parts[parts.index("inputs") + 1 :]))
    return staged


@pytest.mark.slow  # three trainer processes on the emulator: about a minute and a half
def test_two_workers_each_stage_half_the_images_and_give_the_one_worker_result(
    emulator, gcs_bucket, tmp_path
):
    from trainer.synthetic import make_dataset

    local = {"train": tmp_path / "data" / "train", "test": tmp_path / "data" / "test"}
    make_dataset(str(local["train"]), ["a", "b"], 17, min_size=40, max_size=56)
    make_dataset(str(local["test"]), ["a", "b"], 5, min_size=40, max_size=56, seed=1)
    corrupt_files(local["train"] / "b")  # the workers must agree on what to leave out
    for name, folder in local.items():
        emulator.upload_dir(folder, f"gs://{gcs_bucket}/data/{name}")
    folders = {name: f"gs://{gcs_bucket}/data/{name}" for name in local}
    every = {
        f"{gcs_bucket}/data/{name}/{p.relative_to(folder)}"
        for name, folder in local.items()
        for p in folder.rglob("*")
        if p.is_file()
    }

    reference = tmp_path / "one-worker"
    _finish(
        _trainer(
            folders,
            reference,
            "data.batch_size=16",
            f"storage.cache_dir={tmp_path / 'cache-one'}",
        )
    )
    out = tmp_path / "two-workers"
    ports = free_ports(2)
    with all_stopped([]) as workers:
        for index in range(2):
            env = {"TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(tmp_path)}
            cache = f"storage.cache_dir={tmp_path / f'cache-{index}'}"
            workers.append(_trainer(folders, out, "data.batch_size=8", cache, env=env))
        logs = [_finish(worker) for worker in workers]

    staged = [_staged(tmp_path / f"cache-{index}") for index in range(2)]
    assert _staged(tmp_path / "cache-one") == every
    assert staged[0] | staged[1] == every and not staged[0] & staged[1]  # each image once
    for share in staged:
        assert 0.3 * len(every) <= len(share) <= 0.7 * len(every), (len(share), len(every))
    assert all("skipping 3 undecodable image(s) in the training set" in log for log in logs)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_test"]) == (expected["num_train"], 10)
    assert metrics["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-3)
    images = sorted(str(p) for p in local["test"].rglob("*.jpg"))
    np.testing.assert_allclose(
        _serve(os.fspath(out / "saved_model"), images),
        _serve(os.fspath(reference / "saved_model"), images),
        atol=1e-4,
    )
