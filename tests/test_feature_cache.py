"""The feature cache shared across runs: keys, hits and misses, corrupt entries, and several
processes missing at once, on a local folder and on a real GCS emulator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, trainer_env
from trainer import feature_cache as fc
from trainer.synthetic import make_dataset

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures


@pytest.fixture
def images(tmp_path) -> list[str]:
    make_dataset(str(tmp_path / "images"), ["cat", "dog"], 3, min_size=40, max_size=56, seed=1)
    return sorted(str(p) for p in (tmp_path / "images").rglob("*.jpg"))


@pytest.fixture
def weights(tmp_path) -> str:
    path = tmp_path / "backbone.weights.h5"
    path.write_bytes(b"\x89HDF weights v1" * 1000)
    return str(path)


def _key(
    files,
    weights_file,
    image_size=160,
    precision="float32",
    known=None,
    backbone="resnet50-avg-folded",
) -> str:
    return fc.feature_key(
        files=fc.file_digests(files, known=known),
        weights=fc.weights_digest(weights_file, seed=42),
        image_size=image_size,
        precision=precision,
        backbone=backbone,
    )


def _counting(features):
    calls = []

    def compute():
        calls.append(1)
        return features

    return compute, calls


# -- keys --------------------------------------------------------------------------------------


def test_the_same_inputs_give_the_same_key_and_each_changed_input_another(images, weights):
    key = _key(images, weights)
    assert _key(list(images), weights) == key

    changed = Path(images[0])
    changed.write_bytes(changed.read_bytes() + b"\0")  # one image re-encoded
    assert _key(images, weights) != key
    Path(weights).write_bytes(b"\x89HDF weights v2" * 1000)
    changed_weights = _key(images, weights)
    assert changed_weights not in (key, _key(images, None), _key(images, "imagenet"))
    assert _key(images, weights, image_size=224) != changed_weights
    assert _key(images, weights, precision="mixed_bfloat16") != changed_weights
    # Keras' own layers (a fine-tuning run's phase 1) and the folded graph differ in the last bits
    assert _key(images, weights, backbone="resnet50-avg") != changed_weights
    assert _key(images[::-1], weights) != changed_weights  # rows follow the files' order


def test_renamed_files_with_the_same_contents_share_features(images, weights, tmp_path):
    key = _key(images, weights)
    moved = []
    for i, path in enumerate(images):  # another folder, other class names, same bytes
        copy = tmp_path / "elsewhere" / f"class{i % 2}" / f"{i}.jpg"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
        moved.append(str(copy))
    assert _key(moved, weights) == key


def _run_hits(data: Path) -> bool:
    """Whether the training split of data/train, as trainer.data lists it, finds features in
    the cache data/features through the run's own lookup (feature_cache.split_features); on a
    miss the split's (stand-in) features are stored there."""
    from trainer.data import load_splits

    _, train, _ = load_splits(str(data / "train"), str(data / "test"), 0.2, seed=42)
    cache = fc.RunCache(uri=str(data / "features"), spill_dir=str(data / "spill"))
    backbone = fc.Backbone(weights="w", image_size=32, precision="float32", kind="folded")
    _, hit = fc.split_features(
        cache,
        name="train",
        files=train.files,
        backbone=backbone,
        compute=lambda: np.arange(len(train.files) * 4, dtype=np.float32).reshape(-1, 4),
        mmap=False,
    )
    return hit


def test_a_class_rename_that_reorders_the_split_is_another_key(tmp_path):
    """Rows follow the split's files: renaming cat/ to zebra/ puts its images after dog's, so
    the cached rows of the old order would pair cat features with dog labels. A rename that
    keeps the order (cat/ to ant/) still hits."""
    for split in ("train", "test"):
        make_dataset(str(tmp_path / split), ["cat", "dog"], 4, min_size=40, max_size=56, seed=1)
    assert not _run_hits(tmp_path)  # computed and stored
    assert _run_hits(tmp_path)

    def rename(old: str, new: str) -> None:
        for split in ("train", "test"):
            (tmp_path / split / old).rename(tmp_path / split / new)

    rename("cat", "ant")
    assert _run_hits(tmp_path)
    rename("ant", "zebra")
    assert not _run_hits(tmp_path)


def test_random_weights_are_keyed_by_their_seed_alike_in_every_process():
    """The points of a sweep, a retried pod, the next run: each is another process, and each
    must find the entry its seed's random backbone stored."""
    code = "from trainer import feature_cache as fc; print(fc.weights_digest(None, seed=1))"
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=trainer_env(), capture_output=True, text=True
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == fc.weights_digest(None, seed=1)
    assert fc.weights_digest(None, seed=1) != fc.weights_digest(None, seed=2)


def test_imagenet_is_keyed_by_the_hash_keras_checks_its_notop_file_against():
    from keras.src.applications.resnet import WEIGHTS_HASHES

    assert fc.IMAGENET_NOTOP_MD5 == WEIGHTS_HASHES["resnet50"][1]


def test_staged_gcs_objects_are_keyed_by_their_listing(emulator, gcs_bucket, images, tmp_path):
    """Objects staged from gs:// are identified by the size and CRC32C of their listing
    (not read again); a changed object changes the key."""
    from trainer.gcs import list_objects

    root = Path(images[0]).parents[1]
    emulator.upload_dir(root, f"gs://{gcs_bucket}/data")
    local = tmp_path / "staged"

    def key():
        known = fc.listing_digests(
            list_objects(f"gs://{gcs_bucket}/data", "k", lambda n: True, 10), str(local)
        )
        staged = [str(local / Path(p).relative_to(root)) for p in images]
        assert all(path in known for path in staged)
        return _key(staged, None, known=known)  # the staged files need not exist

    before = key()
    assert key() == before
    blob = emulator.client().bucket(gcs_bucket).blob(f"data/{Path(images[2]).relative_to(root)}")
    data = Path(images[2]).read_bytes()
    blob.upload_from_string(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    assert key() != before


# -- hits, misses, corrupt entries ----------------------------------------------------------


@pytest.fixture(params=["local", "gcs"])
def cache_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "features")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket}/sweep/features"


def test_a_miss_computes_and_stores_and_the_next_run_hits(cache_uri, images, weights, tmp_path):
    features = np.random.default_rng(0).normal(size=(len(images), 8)).astype(np.float32)
    key = _key(images, weights)
    compute, calls = _counting(features)

    first, hit = fc.cached_features(cache_uri, key, compute, rows=len(images))
    assert (hit, len(calls)) == (False, 1)
    again, hit = fc.cached_features(cache_uri, key, compute, rows=len(images))
    assert (hit, len(calls)) == (True, 1)
    np.testing.assert_array_equal(again, features)
    mapped = fc.lookup(cache_uri, key, rows=len(images), mmap=True, local_dir=str(tmp_path / "l"))
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, features)

    Path(images[1]).write_bytes(Path(images[1]).read_bytes()[:-10])  # an image changed
    _, hit = fc.cached_features(cache_uri, _key(images, weights), compute, rows=len(images))
    assert (hit, len(calls)) == (False, 2)


def test_a_local_entry_appears_under_its_name_only_once_complete(tmp_path, monkeypatch):
    """Another run may look the key up at any moment: while the entry's bytes are being
    written, its name must not exist yet (a reader would find half an entry, take it for a
    corrupt one and remove it)."""
    cache = tmp_path / "features"
    features = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    seen = []
    save = np.save

    def save_then_look(file, array, **kwargs):  # the array is written, the footer is not yet
        save(file, array, **kwargs)
        file.flush()
        seen.append(sorted(p.name for p in cache.iterdir()))

    monkeypatch.setattr(np, "save", save_then_look)
    assert fc.store(str(cache), "k", features) is True

    (names,) = seen
    assert "k.npy" not in names
    np.testing.assert_array_equal(fc.lookup(str(cache), "k", rows=6), features)


def test_text_entries_round_trip_and_the_first_writer_wins_on_gcs(cache_uri):
    """The bad-image scan's findings (trainer/inputs.py) are text entries beside the features."""
    assert fc.load_text(cache_uri, "scan-1-abc.json") is None
    fc.store_text(cache_uri, "scan-1-abc.json", '{"bad": [[0, "Input is empty."]]}')
    assert fc.load_text(cache_uri, "scan-1-abc.json") == '{"bad": [[0, "Input is empty."]]}'
    fc.store_text(cache_uri, "scan-1-abc.json", '{"bad": []}')  # a second writer, same key
    kept = fc.load_text(cache_uri, "scan-1-abc.json")
    assert kept == (
        '{"bad": [[0, "Input is empty."]]}' if cache_uri.startswith("gs://") else '{"bad": []}'
    )


def _write_entry(cache_uri: str, key: str, data: bytes, emulator=None) -> None:
    if cache_uri.startswith("gs://"):
        bucket, _, prefix = cache_uri[len("gs://") :].partition("/")
        emulator.client().bucket(bucket).blob(f"{prefix}/{key}.npy").upload_from_string(data)
    else:
        Path(cache_uri).mkdir(parents=True, exist_ok=True)
        Path(cache_uri, f"{key}.npy").write_bytes(data)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_rows", "wrong_dtype"])
def test_a_corrupt_or_partial_entry_is_a_miss_and_is_replaced(cache_uri, damage, tmp_path, request):
    rows = 5
    good = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    path = tmp_path / "entry.npy"
    if damage == "wrong_rows":
        np.save(path, good[:3])
    elif damage == "wrong_dtype":
        np.save(path, good.astype(np.float64))
    else:
        np.save(path, good)
    data = path.read_bytes()
    data = {"truncated": data[: len(data) - 7], "garbage": b"not an array"}.get(damage, data)
    emulator = request.getfixturevalue("emulator") if cache_uri.startswith("gs://") else None
    _write_entry(cache_uri, "k", data, emulator)

    assert fc.lookup(cache_uri, "k", rows=rows) is None
    compute, calls = _counting(good)
    features, hit = fc.cached_features(cache_uri, "k", compute, rows=rows)
    assert (hit, len(calls)) == (False, 1)
    np.testing.assert_array_equal(fc.lookup(cache_uri, "k", rows=rows), good)


def test_on_gcs_the_first_writer_wins_and_a_later_one_keeps_its_copy(gcs_bucket):
    uri = f"gs://{gcs_bucket}/features"
    first = np.ones((2, 3), np.float32)
    assert fc.store(uri, "k", first) is True
    assert fc.store(uri, "k", first * 2) is False
    np.testing.assert_array_equal(fc.lookup(uri, "k", rows=2), first)


# -- several processes at once ----------------------------------------------------------------

WORKER = """
import json, sys, time
import numpy as np
from trainer.feature_cache import cached_features

uri, key, marker, delay, wait, fail = sys.argv[1:7]

def compute():
    open(marker, "w").write("computed")
    time.sleep(float(delay))
    if fail == "1":
        raise RuntimeError("backbone pass failed")
    return np.full((3, 4), 7.0, np.float32)

features, hit = cached_features(
    uri, key, compute, rows=3, wait_seconds=float(wait), poll_seconds=0.1
)
print(json.dumps({"hit": hit, "sum": float(features.sum())}))
"""


class Workers:
    """Processes running WORKER; every one is killed at the end of the test, whatever happens."""

    def __init__(self, tmp_path: Path):
        self.tmp_path, self.processes = tmp_path, []

    def start(self, uri, name, delay=2.0, wait=60.0, fail=False) -> subprocess.Popen:
        marker = self.tmp_path / f"{name}.computed"
        args = [uri, "k", str(marker), str(delay), str(wait), "1" if fail else "0"]
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, *args],
            cwd=REPO,
            env=trainer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        process.marker = marker
        self.processes.append(process)
        return process

    def result(self, process, timeout=90) -> dict:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-2000:]
        return json.loads(out.strip().splitlines()[-1])

    def wait_until_computing(self, process, timeout=30) -> None:
        deadline = time.monotonic() + timeout
        while not process.marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.fixture
def workers(tmp_path):
    pool = Workers(tmp_path)
    yield pool
    pool.stop()


def test_two_processes_missing_at_once_compute_once_and_both_finish(cache_uri, workers):
    """The second finds the first's claim and waits for its entry instead of recomputing."""
    first = workers.start(cache_uri, "first")
    workers.wait_until_computing(first)
    second = workers.start(cache_uri, "second")

    assert workers.result(first) == {"hit": False, "sum": 84.0}
    assert workers.result(second) == {"hit": True, "sum": 84.0}
    assert not second.marker.exists()


def test_two_processes_that_both_compute_both_finish_with_one_good_entry(cache_uri, workers):
    """With no waiting (wait 0: a multi-worker run, or a claim given up on) both compute and
    both store at nearly the same moment; the entry is whole."""
    a = workers.start(cache_uri, "a", delay=0.5, wait=0)
    b = workers.start(cache_uri, "b", delay=0.5, wait=0)
    assert workers.result(a)["sum"] == workers.result(b)["sum"] == 84.0
    assert fc.lookup(cache_uri, "k", rows=3).sum() == 84.0


def test_a_failed_claim_holder_releases_it_and_the_waiter_computes_at_once(cache_uri, workers):
    first = workers.start(cache_uri, "first", delay=1.0, fail=True)
    workers.wait_until_computing(first)
    second = workers.start(cache_uri, "second", delay=0.0, wait=120)
    started = time.monotonic()

    assert workers.result(second) == {"hit": False, "sum": 84.0}
    assert time.monotonic() - started < 60  # not the 120 s bound: the claim was released
    first.communicate(timeout=30)
    assert first.returncode != 0


def test_a_claim_left_by_a_killed_run_delays_the_next_run_only_for_the_bounded_wait(
    cache_uri, workers
):
    first = workers.start(cache_uri, "first", delay=600)
    workers.wait_until_computing(first)
    first.kill()  # its claim stays behind
    first.communicate()
    second = workers.start(cache_uri, "second", delay=0.0, wait=3)

    assert workers.result(second, timeout=60) == {"hit": False, "sum": 84.0}
    third = workers.start(cache_uri, "third", delay=0.0, wait=3)
    assert workers.result(third) == {"hit": True, "sum": 84.0}


# -- what the user must fix -------------------------------------------------------------------


def test_a_cache_folder_that_cannot_be_created_names_the_key(tmp_path):
    from trainer import TrainerError

    (tmp_path / "a-file").write_text("not a folder")
    compute, _ = _counting(np.ones((1, 2), np.float32))
    with pytest.raises(TrainerError, match=r"^storage.feature_cache=.*a-file/features: cannot use"):
        fc.cached_features(str(tmp_path / "a-file" / "features"), "k", compute, rows=1)


def test_no_access_to_the_cache_bucket_names_the_key_and_the_role(gcs_bucket, proxy):
    from trainer import TrainerError

    proxy.fail(403)
    compute, calls = _counting(np.ones((1, 2), np.float32))
    with pytest.raises(TrainerError, match=r"^storage.feature_cache=gs://.*objectAdmin"):
        fc.cached_features(f"gs://{gcs_bucket}/features", "k", compute, rows=1)
    assert not calls  # failed before the backbone pass, not after it
