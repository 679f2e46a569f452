"""trainer.gcs and trainer.output against a real GCS emulator on loopback: staging in, syncing
and publishing out, and what users see when GCS fails (retries for transient errors, one clear
line otherwise)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from trainer import TrainerError
from trainer.data import stage_image_folder
from trainer.gcs import stage_file, stage_prefix
from trainer.output import Output
from trainer.predict import stage_model_dir
from trainer.synthetic import make_dataset

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    make_dataset(str(root), ["cat", "dog"], 6, min_size=32, max_size=40, seed=3)
    return root


def _run_dir(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


RUN_FILES = {
    "saved_model/saved_model.pb": b"pb",
    "saved_model/variables/variables.index": b"index",
    "labels.txt": b"cat\ndog\n",
    "metrics.json": b"{}",
    "config.yaml": b"seed: 42\n",
    "tensorboard/train/events.out.tfevents.1": b"events",
}


def test_staging_twice_downloads_nothing_and_a_changed_object_again(
    emulator, gcs_bucket, images, tmp_path
):
    client = emulator.client()
    count = emulator.upload_dir(images, f"gs://{gcs_bucket}/data/train")
    uri, local = f"gs://{gcs_bucket}/data/train", tmp_path / "cache"

    first = stage_prefix(uri, str(local), "data.train_dir")
    assert (first.downloaded, first.skipped) == (count, 0)
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*.jpg")) == sorted(
        p.relative_to(images).as_posix() for p in images.rglob("*.jpg")
    )

    second = stage_prefix(uri, str(local), "data.train_dir")
    assert (second.downloaded, second.skipped, second.bytes) == (0, count, 0)

    # Same size, new content: only the checksum tells them apart.
    changed = next(iter(sorted(images.rglob("*.jpg"))))
    name = changed.relative_to(images).as_posix()
    new = bytes(b ^ 0xFF for b in changed.read_bytes())
    client.bucket(gcs_bucket).blob(f"data/train/{name}").upload_from_string(new)
    third = stage_prefix(uri, str(local), "data.train_dir")
    assert (third.downloaded, third.skipped) == (1, count - 1)
    assert (local / name).read_bytes() == new


def test_staged_folder_follows_objects_deleted_from_the_bucket(
    emulator, gcs_bucket, images, tmp_path
):
    client = emulator.client()
    emulator.upload_dir(images, f"gs://{gcs_bucket}/train")
    uri, local = f"gs://{gcs_bucket}/train", tmp_path / "cache"
    stage_prefix(uri, str(local), "data.train_dir")
    gone = sorted(images.rglob("*.jpg"))[0].relative_to(images).as_posix()
    client.bucket(gcs_bucket).blob(f"train/{gone}").delete()

    stage_prefix(uri, str(local), "data.train_dir")
    assert not (local / gone).exists()


def test_weights_file_is_staged_once_with_its_name(emulator, gcs_bucket, tmp_path):
    blob = emulator.client().bucket(gcs_bucket).blob("models/backbone.weights.h5")
    blob.upload_from_string(b"w" * 1000)
    uri = f"gs://{gcs_bucket}/models/backbone.weights.h5"

    local = stage_file(uri, str(tmp_path), "model.weights")
    assert local.endswith("backbone.weights.h5") and Path(local).read_bytes() == b"w" * 1000
    mtime = Path(local).stat().st_mtime_ns
    time.sleep(0.01)
    assert stage_file(uri, str(tmp_path), "model.weights") == local
    assert Path(local).stat().st_mtime_ns == mtime  # not downloaded again


@pytest.mark.parametrize(
    ("call", "uri", "says"),
    [
        ("dir", "gs://no-such-bucket-xyz/data/train", "bucket gs://no-such-bucket-xyz not found"),
        ("dir", "gs://{bucket}/no/such/prefix", "no objects under this prefix"),
        (
            "file",
            "gs://no-such-bucket-xyz/w.weights.h5",
            "bucket gs://no-such-bucket-xyz not found",
        ),
        ("file", "gs://{bucket}/missing.weights.h5", "no such object"),
        ("output", "gs://no-such-bucket-xyz/runs/1", "bucket gs://no-such-bucket-xyz not found"),
    ],
)
def test_missing_bucket_or_prefix_names_the_uri(gcs_bucket, tmp_path, call, uri, says):
    uri = uri.format(bucket=gcs_bucket)
    with pytest.raises(TrainerError) as error:
        if call == "dir":
            stage_prefix(uri, str(tmp_path), "data.train_dir")
        elif call == "file":
            stage_file(uri, str(tmp_path), "model.weights")
        else:
            Output(uri, False, str(tmp_path), 0).check()
    message = str(error.value)
    assert uri in message and says in message and "\n" not in message


def test_access_denied_names_the_iam_role(gcs_bucket, images, proxy, tmp_path):
    proxy.fail(403)
    with pytest.raises(TrainerError, match="roles/storage.objectViewer"):
        stage_prefix(f"gs://{gcs_bucket}/train", str(tmp_path), "data.train_dir")
    with pytest.raises(TrainerError, match="roles/storage.objectAdmin"):
        Output(f"gs://{gcs_bucket}/run", False, str(tmp_path), 0).check()


def test_missing_credentials_say_how_to_provide_them(tmp_path, monkeypatch):
    # No emulator: the real ADC path, which fails before any request is sent.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(TrainerError, match="GOOGLE_APPLICATION_CREDENTIALS") as error:
        stage_prefix("gs://some-bucket/train", str(tmp_path), "data.train_dir")
    assert str(error.value).startswith("data.train_dir=gs://some-bucket/train: ")


def test_transient_errors_while_staging_are_retried(emulator, gcs_bucket, images, proxy, tmp_path):
    count = emulator.upload_dir(images, f"gs://{gcs_bucket}/train")
    proxy.fail(503, times=4, methods=("GET",))
    report = stage_prefix(f"gs://{gcs_bucket}/train", str(tmp_path), "data.train_dir")
    assert report.downloaded == count
    assert ("GET", 503) in proxy.log


def test_transient_errors_while_downloading_are_retried(
    emulator, gcs_bucket, images, proxy, tmp_path
):
    """The listing goes through; then object downloads get 503s (GCS under load): each is
    retried, and the staged files are the bucket's."""
    count = emulator.upload_dir(images, f"gs://{gcs_bucket}/train")
    proxy.fail(503, times=4, methods=("GET",), downloads_only=True)
    report = stage_prefix(f"gs://{gcs_bucket}/train", str(tmp_path / "staged"), "data.train_dir")
    assert report.downloaded == count
    answers = zip(proxy.log, proxy.paths, strict=True)  # recorded together, in order
    failed = [path for (_, status), (_, path) in answers if status == 503]
    assert len(failed) == 4 and all("alt=media" in path for path in failed)
    for image in images.rglob("*.jpg"):
        staged = tmp_path / "staged" / image.relative_to(images)
        assert staged.read_bytes() == image.read_bytes()


def _prepared_output(uri: str, tmp_path: Path, **kwargs) -> Output:
    output = Output(uri, kwargs.pop("overwrite", False), str(tmp_path / "cache"), 0, **kwargs)
    output.prepare()
    _run_dir(Path(output.local_dir), RUN_FILES)
    return output


def test_publish_uploads_every_output_and_success_last(emulator, gcs_bucket, tmp_path):
    uri = f"gs://{gcs_bucket}/runs/1"
    output = _prepared_output(uri, tmp_path)
    output.sync()
    client = emulator.client()
    assert emulator.names(uri) == sorted(n for n in RUN_FILES if "saved_model" not in n)

    output.publish()
    output.close()
    blobs = {b.name: b for b in client.list_blobs(gcs_bucket, prefix="runs/1/")}
    assert sorted(blobs) == sorted(f"runs/1/{n}" for n in [*RUN_FILES, "_SUCCESS"])
    success = blobs.pop("runs/1/_SUCCESS")
    assert all(success.generation > b.generation for b in blobs.values())
    assert blobs["runs/1/labels.txt"].download_as_bytes() == b"cat\ndog\n"


def test_sync_runs_in_the_background_and_leaves_the_model_for_publish(
    emulator, gcs_bucket, tmp_path
):
    uri = f"gs://{gcs_bucket}/runs/live"
    output = Output(uri, False, str(tmp_path / "cache"), sync_seconds=1)
    output.prepare()
    try:
        _run_dir(Path(output.local_dir), RUN_FILES)
        deadline = time.monotonic() + 20
        while "tensorboard/train/events.out.tfevents.1" not in emulator.names(uri):
            assert time.monotonic() < deadline, "events were not synced in the background"
            time.sleep(0.2)
        # An event file grows while training runs: the next sync sends the new size.
        events = Path(output.local_dir) / "tensorboard/train/events.out.tfevents.1"
        events.write_bytes(b"events and more events")
        while True:
            blob = (
                emulator.client()
                .bucket(gcs_bucket)
                .get_blob("runs/live/tensorboard/train/events.out.tfevents.1")
            )
            if blob.size == len(b"events and more events"):
                break
            assert time.monotonic() < deadline, "the grown event file was not synced again"
            time.sleep(0.2)
        names = emulator.names(uri)
        assert not any(n.startswith("saved_model") for n in names) and "_SUCCESS" not in names
    finally:
        output.close()


def test_transient_errors_while_publishing_are_retried(emulator, gcs_bucket, proxy, tmp_path):
    uri = f"gs://{gcs_bucket}/runs/flaky"
    output = _prepared_output(uri, tmp_path)
    proxy.fail(503, times=5, methods=("POST", "PUT"))
    output.publish()
    output.close()
    assert ("POST", 503) in proxy.log
    assert "_SUCCESS" in emulator.names(uri)


def test_when_uploads_keep_failing_publish_fails_and_no_success_exists(
    emulator, gcs_bucket, proxy, tmp_path
):
    uri = f"gs://{gcs_bucket}/runs/down"
    output = _prepared_output(uri, tmp_path, retry_seconds=3)
    proxy.fail(503, methods=("POST", "PUT"))
    with pytest.raises(Exception) as error:  # noqa: B017 - a crash, not a TrainerError
        output.publish()
    assert not isinstance(error.value, TrainerError)
    output.close()
    assert sum(1 for entry in proxy.log if entry == ("POST", 503)) > len(RUN_FILES)  # retried
    assert "_SUCCESS" not in emulator.names(uri)


def test_emulator_stopped_during_publish_leaves_no_success(spare_emulator, tmp_path, monkeypatch):
    own = spare_emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", own.url)
    own.client().create_bucket("stopped")
    output = _prepared_output("gs://stopped/run", tmp_path, retry_seconds=3)
    own.stop()
    with pytest.raises(Exception) as error:  # noqa: B017 - a crash, not a TrainerError
        output.publish()
    assert not isinstance(error.value, TrainerError)
    # Retried with backoff until the deadline, then gave up with the library's timeout error
    # (the first backoff is at most 1 s of the 3 s, so a timeout means at least one retry).
    # Not a wall-clock bound: the library's backoff is full jitter.
    assert "Timeout of 3.0s exceeded" in str(error.value)
    assert isinstance(error.value.__cause__, requests.exceptions.ConnectionError)
    output.close()
    own.start()
    assert "_SUCCESS" not in own.names("gs://stopped/run")


def test_sync_failing_during_training_is_logged_and_training_goes_on(
    emulator, gcs_bucket, proxy, tmp_path, caplog
):
    uri = f"gs://{gcs_bucket}/runs/blip"
    output = _prepared_output(uri, tmp_path, retry_seconds=1)
    proxy.fail(503, methods=("POST", "PUT"))
    output.sync()  # an epoch end: must not raise, publish sends everything again
    assert "sync to" in caplog.text and "failed" in caplog.text
    proxy.heal()
    output.publish()
    assert "_SUCCESS" in emulator.names(uri)


def test_a_run_that_stops_before_publish_uploads_what_it_wrote_but_no_success(
    emulator, gcs_bucket, tmp_path
):
    uri = f"gs://{gcs_bucket}/runs/below-target"
    output = _prepared_output(uri, tmp_path)  # e.g. exit 3: metrics written, no export
    output.close()
    names = emulator.names(uri)
    assert {"metrics.json", "labels.txt", "tensorboard/train/events.out.tfevents.1"} <= set(names)
    assert "_SUCCESS" not in names and not any(n.startswith("saved_model") for n in names)


def test_a_published_run_is_kept_unless_overwrite(emulator, gcs_bucket, tmp_path):
    uri = f"gs://{gcs_bucket}/runs/done"
    output = _prepared_output(uri, tmp_path)
    output.publish()
    output.close()
    client = emulator.client()
    generations = {b.name: b.generation for b in client.list_blobs(gcs_bucket)}

    with pytest.raises(TrainerError, match=f"output.dir={uri}: holds the outputs"):
        Output(uri, False, str(tmp_path / "other"), 0).prepare()
    assert {b.name: b.generation for b in client.list_blobs(gcs_bucket)} == generations

    again = Output(uri, True, str(tmp_path / "other"), 0)
    again.prepare()  # overwrite: the earlier outputs go, _SUCCESS first
    assert emulator.names(uri) == []
    again.close()


def test_predict_stages_a_finished_run_only(emulator, gcs_bucket, tmp_path):
    uri = f"gs://{gcs_bucket}/runs/model"
    output = _prepared_output(uri, tmp_path)
    output.sync()
    with pytest.raises(TrainerError, match="no saved_model.pb and no _SUCCESS"):
        stage_model_dir(uri, str(tmp_path / "models"))
    output.publish()
    local = Path(stage_model_dir(uri, str(tmp_path / "models")))
    assert (local / "saved_model" / "saved_model.pb").read_bytes() == b"pb"
    direct = Path(stage_model_dir(f"{uri}/saved_model", str(tmp_path / "models")))
    assert (direct / "variables" / "variables.index").read_bytes() == b"index"


def test_a_preempted_run_is_resumed_from_its_synced_backup_which_goes_once_published(
    emulator, gcs_bucket, tmp_path
):
    """A retried pod has a new, empty disk: the backup comes back from output.dir."""
    uri = f"gs://{gcs_bucket}/runs/preempted"
    first = Output(uri, False, str(tmp_path / "pod1"), 0)
    first.prepare()
    backup = {
        "backup/head/training_metadata.json": b'{"epoch": 3, "batch": 0}',
        "backup/head/latest.weights.h5": b"weights",
        "metrics.json": b"{}",
    }
    _run_dir(Path(first.local_dir), backup)
    first.close()  # SIGTERM: the job stops, close() pushes what exists
    assert {"backup/head/training_metadata.json", "metrics.json"} <= set(emulator.names(uri))

    retry = Output(uri, False, str(tmp_path / "pod2"), 0)
    retry.prepare()  # not refused although metrics.json is there: the run never finished
    local = Path(retry.local_dir)
    assert (
        local / "backup/head/training_metadata.json"
    ).read_bytes() == b'{"epoch": 3, "batch": 0}'
    assert not (local / "metrics.json").exists()

    _run_dir(local, RUN_FILES)
    retry.publish()
    retry.close()
    names = emulator.names(uri)
    assert "_SUCCESS" in names and not [n for n in names if n.startswith("backup/")]
    assert not (local / "backup").exists()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_other_workers_get_a_copy_of_the_chiefs_backup(emulator, gcs_bucket, tmp_path, where):
    """Multi-worker: every worker must resume at the chief's epoch, from the chief's backup."""
    if where == "gcs":
        uri = f"gs://{gcs_bucket}/runs/multi"
        chief = Output(uri, False, str(tmp_path / "chief"), 0)
    else:
        uri = str(tmp_path / "out")
        chief = Output(uri, False, str(tmp_path / "cache"), 0)
    chief.prepare()
    _run_dir(Path(chief.local_dir), {"backup/head/training_metadata.json": b'{"epoch": 2}'})
    chief.close()

    worker = Output(uri, False, str(tmp_path / "worker-cache"), 0)
    assert worker.fetch_backup(str(tmp_path / "private"))
    metadata = tmp_path / "private" / "backup" / "head" / "training_metadata.json"
    assert metadata.read_bytes() == b'{"epoch": 2}'
    assert not Output(uri, True, str(tmp_path / "w2"), 0).fetch_backup(str(tmp_path / "p2"))


def test_staging_an_image_folder_fetches_only_image_files(emulator, gcs_bucket, images, tmp_path):
    """README: image folders fetch only JPEG, PNG, BMP, GIF (any case); hidden files ignored."""
    emulator.upload_dir(images, f"gs://{gcs_bucket}/train")
    bucket = emulator.client().bucket(gcs_bucket)
    for name in ("train/notes.txt", "train/cat/model.ckpt", "train/dog/.hidden.jpg"):
        bucket.blob(name).upload_from_string(b"not an image")
    png = io.BytesIO()
    Image.open(next(images.rglob("*.jpg"))).save(png, "PNG")
    bucket.blob("train/dog/UPPER.PNG").upload_from_string(png.getvalue())

    folder = stage_image_folder(
        f"gs://{gcs_bucket}/train", str(tmp_path / "cache"), "data.train_dir"
    )
    local = Path(folder.root)

    staged = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    assert staged == sorted([*expected, "dog/UPPER.PNG"])


def test_a_corrupt_download_fails_and_never_replaces_the_staged_file(
    emulator, gcs_bucket, images, proxy, tmp_path
):
    """Every download is checked against the object's CRC32C and written under a temporary
    name: a corrupted transfer fails, and the copy staged earlier stays whole under its name."""
    emulator.upload_dir(images, f"gs://{gcs_bucket}/train")
    uri, local = f"gs://{gcs_bucket}/train", tmp_path / "cache"
    stage_prefix(uri, str(local), "data.train_dir")
    staged = sorted(local.rglob("*.jpg"))[0]
    name, old = staged.relative_to(local).as_posix(), staged.read_bytes()
    new = bytes(b ^ 0xFF for b in old)
    emulator.client().bucket(gcs_bucket).blob(f"train/{name}").upload_from_string(new)

    proxy.corrupt_downloads()
    with pytest.raises(Exception, match="(?i)checksum|corrupt|crc"):
        stage_prefix(uri, str(local), "data.train_dir")
    assert staged.read_bytes() == old
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert files == {p.relative_to(images).as_posix() for p in images.rglob("*.jpg")}

    proxy.corrupt = False
    stage_prefix(uri, str(local), "data.train_dir")
    assert staged.read_bytes() == new


def test_overwrite_deletes_success_before_the_other_outputs(emulator, gcs_bucket, tmp_path):
    """A reader must never see _SUCCESS beside half-deleted outputs: it goes first."""
    from tests.gcs_emulator import FaultProxy

    uri = f"gs://{gcs_bucket}/runs/replaced"
    output = _prepared_output(uri, tmp_path)
    output.publish()
    output.close()
    proxy = FaultProxy(emulator.port)
    try:
        again = Output(uri, True, str(tmp_path / "again"), 0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
            again.prepare()
            again.close()
    finally:
        proxy.close()
    deleted = [path.split("?")[0] for method, path in proxy.paths if method == "DELETE"]
    assert deleted and deleted[0].endswith("%2F_SUCCESS"), deleted
    assert len(deleted) == len(RUN_FILES) + 1 and emulator.names(uri) == []
