"""Image folders: which files count, how classes are named, what bad input says, decoding."""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    SMALL,
    configure,
    corrupt_files,
    last_error_line,
    make_folders,
    run_trainer,
)
from tests.support.hygiene import forget_process_caches
from trainer import TrainerError
from trainer.data import (
    PixelCache,
    drop_bad_images,
    hold_out,
    image_dataset,
    list_image_folder,
    load_splits,
)
from trainer.images import decode_image
from trainer.job import run
from trainer.rundir import RunDir
from trainer.synthetic import make_dataset


def test_classes_are_sorted_folder_names_and_only_images_count(tmp_path):
    for name in ["zebra", "Apple", "mango"]:
        (tmp_path / name).mkdir()
        for file in ["a.JPG", "b.jpeg", "c.Png", "d.bmp", "e.GIF", "notes.txt", ".hidden.jpg"]:
            (tmp_path / name / file).write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("not a class")

    found = list_image_folder(str(tmp_path), "data.train_dir")

    assert list(found) == ["Apple", "mango", "zebra"]
    assert [p.rsplit("/", 1)[-1] for p in found["mango"]] == [
        "a.JPG",
        "b.jpeg",
        "c.Png",
        "d.bmp",
        "e.GIF",
    ]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "need at least 2"),
        ({"only": 2}, "need at least 2"),
        ({"a": 2, "empty": 0}, "class folder 'empty' holds no images"),
    ],
)
def test_unusable_training_folder_is_refused_naming_it(tmp_path, layout, message):
    for name, count in layout.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.jpg").write_bytes(b"x")
    with pytest.raises(TrainerError, match=message) as error:
        list_image_folder(str(tmp_path), "data.train_dir")
    assert str(tmp_path) in str(error.value)


def test_test_class_missing_from_training_set_is_refused(tmp_path):
    make_dataset(str(tmp_path / "train"), ["a", "b"], 2, min_size=8, max_size=8)
    make_dataset(str(tmp_path / "test"), ["a", "b", "c"], 2, min_size=8, max_size=8)
    with pytest.raises(TrainerError, match=r"\['c'\] not in data.train_dir"):
        load_splits(str(tmp_path / "train"), str(tmp_path / "test"), 0.2, seed=0)


def test_missing_folder_exits_2_naming_the_path(tmp_path):
    result = run_trainer(f"data.train_dir={tmp_path}/nowhere", *SMALL, cwd=tmp_path)
    assert result.returncode == 2
    assert last_error_line(result) == (
        f"trainer: error: data.train_dir={tmp_path}/nowhere: folder not found"
    )


def test_validation_split_is_seeded_per_class_and_disjoint(tmp_path):
    make_dataset(str(tmp_path), ["a", "b"], 10, min_size=8, max_size=8)

    classes, train, test = load_splits(str(tmp_path), None, 0.3, seed=7)
    _, train_again, test_again = load_splits(str(tmp_path), None, 0.3, seed=7)
    _, _, test_other = load_splits(str(tmp_path), None, 0.3, seed=8)

    assert classes == ["a", "b"]
    assert train.files == train_again.files and test.files == test_again.files
    assert test.files != test_other.files
    assert not set(train.files) & set(test.files)
    assert len(train) + len(test) == 20
    assert np.bincount(test.labels).tolist() == [3, 3]


def test_finetuning_validation_set_is_held_out_of_training_per_class_never_the_test_set(tmp_path):
    """train.finetune_validation_split: a seeded share of each class's training images, apart
    from the images the head trains on and from the test set (here itself held out)."""
    make_dataset(str(tmp_path), ["a", "b"], 20, min_size=8, max_size=8)
    for extra in sorted((tmp_path / "b").iterdir())[12:]:  # classes of 20 and 12 images
        extra.unlink()
    _, train, test = load_splits(str(tmp_path), None, 0.25, seed=7)

    kept, validation = hold_out(train, share=0.2, seed=7, key="k")
    again = hold_out(train, share=0.2, seed=7, key="k")[1]
    other = hold_out(train, share=0.2, seed=8, key="k")[1]

    for seed in range(5):  # 20% of each class's 15 and 9, whatever the seed
        held = hold_out(train, share=0.2, seed=seed, key="k")[1]
        assert np.bincount(held.labels).tolist() == [3, 2]
    assert not set(validation.files) & set(test.files)
    assert not set(validation.files) & set(kept.files)
    assert sorted(kept.files + validation.files) == sorted(train.files)
    assert [train.labels[train.files.index(f)] for f in validation.files] == list(validation.labels)
    assert validation.files == again.files and validation.files != other.files
    with pytest.raises(TrainerError, match="k=0.01: class 0 has 15 training images"):
        hold_out(train, share=0.01, seed=7, key="k")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "GIF"),
        ("RGB", "BMP"),
        ("L", "PNG"),
    ],
)
def test_every_colour_mode_decodes_to_rgb_at_the_configured_size(mode, fmt):
    colour = (200, 40, 30)
    image = Image.new("RGB", (50, 30), colour).convert(mode)
    expected = np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))

    pixels = decode_image(_encoded(image, fmt), 32).numpy()

    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32
    # Mean colours: JPEG is lossy and a GIF palette dithers, but the colour must survive.
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), expected, atol=6)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in [(250, 0, 0), (0, 0, 250)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    pixels = decode_image(buffer.getvalue(), 32).numpy()
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_undecodable_files_are_found_and_left_out(tmp_path, caplog):
    train_dir, _ = make_folders(tmp_path, train=4, test=1)
    bad = corrupt_files(train_dir / "dog")
    _, split, _ = load_splits(str(train_dir), str(tmp_path / "test"), 0.2, seed=0)

    with caplog.at_level("WARNING"):
        kept = drop_bad_images(split, "training", fail=False)

    assert len(kept) == 8 and not {str(p) for p in bad} & set(kept.files)
    assert "skipping 3 undecodable image(s) in the training set" in caplog.text
    for path in bad:
        assert str(path) in caplog.text
    # What is wrong with each, in TensorFlow's words (without its op and function names)
    assert f"{bad[0]} (Input is empty.)" in caplog.text  # empty.jpg
    assert f"{bad[2]} (Unknown image file format." in caplog.text  # garbage.png


def test_a_file_probed_earlier_in_the_process_is_probed_again_once_it_changed(tmp_path):
    """A local sweep's points share one process and the probe's findings: a file that breaks
    (or is fixed) between two points is judged as it is now."""
    train_dir, _ = make_folders(tmp_path, train=4, test=1)
    _, split, _ = load_splits(str(train_dir), str(tmp_path / "test"), 0.2, seed=0)
    assert len(drop_bad_images(split, "training", fail=False)) == len(split)

    broken = Path(split.files[0])
    original = broken.read_bytes()
    broken.write_bytes(original[: len(original) // 2])  # truncated in place
    kept = drop_bad_images(split, "training", fail=False)
    assert str(broken) not in kept.files and len(kept) == len(split) - 1

    broken.write_bytes(original)  # fixed again
    assert len(drop_bad_images(split, "training", fail=False)) == len(split)


def test_corrupt_images_are_skipped_and_reported_by_the_job(trained_run):
    log = trained_run.result.stdout
    assert "skipping 3 undecodable image(s) in the training set" in log
    for path in trained_run.bad_files:
        assert f"skipped {path}" in log
    assert trained_run.metrics["num_train"] == 80  # 2 x 40 good images; the 3 bad ones left out


def test_a_run_over_the_same_files_takes_the_scans_findings_from_the_feature_cache(
    tmp_path, cfg, caplog
):
    """A sweep's pods and reruns decode no image to learn which are bad: the first run's
    findings are in storage.feature_cache, keyed by the files' contents. A changed file, or
    on_bad_image=fail, behaves as it would after a scan."""
    train_dir, test_dir = make_folders(tmp_path / "data", train=12, test=4)
    bad = corrupt_files(train_dir / "dog")
    configure(cfg, f"data.train_dir={train_dir}", f"data.test_dir={test_dir}", "train.epochs=1")
    configure(cfg, f"storage.feature_cache={tmp_path / 'features'}")

    def run_into(name: str, *extra: str) -> str:
        """A run into tmp_path/name, in a process of its own as a pod's would be: its log."""
        forget_process_caches()  # not the probe's findings of the run before
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer"):
            run(configure(copy.deepcopy(cfg), f"output.dir={tmp_path / name}", *extra))
        return caplog.text

    first, second = run_into("first"), run_into("second")
    for log in (first, second):
        assert "skipping 3 undecodable image(s) in the training set" in log
        assert f"skipped {bad[0]} (Input is empty.)" in log
    assert "scanning 35 images" in first and "scanning" not in second
    assert "bad-image scan skipped: 3 of these 35 images are undecodable" in second

    with pytest.raises(TrainerError, match=f"^{bad[0]}: cannot decode image") as failing:
        run_into("failing", "data.on_bad_image=fail")
    assert failing.value.exit_code == 2 and "scanning" not in caplog.text

    bad[0].write_bytes(sorted((train_dir / "cat").glob("*.jpg"))[0].read_bytes())  # now good
    fixed = run_into("fixed")
    assert "scanning 35 images" in fixed
    assert "skipping 2 undecodable image(s) in the training set" in fixed


def test_a_listed_file_that_cannot_be_read_is_reported_by_the_scan_not_a_crash(tmp_path):
    """With storage.feature_cache set the scan first hashes every listed file for its key: a
    file gone (or unreadable) since the listing is one more bad file, as without the cache."""
    from trainer.inputs import start_scan

    train_dir, _ = make_folders(tmp_path, train=3, test=1)
    _, split, _ = load_splits(str(train_dir), str(tmp_path / "test"), 0.2, seed=0)
    gone = Path(split.files[0])
    gone.unlink()

    findings = start_scan(
        (split,), share=(1, 0), cache_uri=str(tmp_path / "features"), digests={}
    ).result(timeout=120)

    assert list(findings.bad) == [str(gone)] and not findings.cached
    assert findings.digests[str(gone)].startswith("unreadable:")


def test_on_bad_image_fail_is_an_error_naming_the_file(tmp_path, cfg):
    train_dir, test_dir = make_folders(tmp_path / "data", train=4, test=2)
    (train_dir / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    configure(cfg, f"data.train_dir={train_dir}", f"data.test_dir={test_dir}")
    with pytest.raises(TrainerError, match=f"^{train_dir}/cat/broken.jpg: cannot decode image"):
        run(configure(cfg, "data.on_bad_image=fail"))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# --- each image decoded once a run (image_dataset's pixel cache) -------------------------------


def _epochs(ds, count: int) -> list[list[bytes]]:
    """`count` passes over `ds` (as Keras' epochs make them): each image's pixels, in order."""
    return [
        [image.tobytes() for x, _ in ds.as_numpy_iterator() for image in x] for _ in range(count)
    ]


def _training_split(tmp_path):
    train_dir, test_dir = make_folders(tmp_path / "data", train=6, test=1)
    return load_splits(str(train_dir), str(test_dir), 0.2, seed=0)[1]


def _decoded(files, size: int = 32) -> np.ndarray:
    import tensorflow as tf

    return np.stack([decode_image(tf.io.read_file(path), size).numpy() for path in files])


def test_each_training_image_is_read_once_over_the_epochs(tmp_path):
    """The epochs after the first serve the kept pixels: every file replaced by another image
    after epoch 1 changes nothing the later epochs see. Kept as uint8, each pixel is within the
    rounding (0.5) of decode_image's float32, and the model still gets float32."""
    split = _training_split(tmp_path)
    cache = PixelCache(max_mb=64, path=RunDir(str(tmp_path / "run")).pixel_spill("train"))
    ds = image_dataset(split, 32, 4, shuffle=True, seed=3, cache=cache)
    assert ds.element_spec[0].dtype.name == "float32"
    first = _epochs(ds, 1)[0]
    original = _decoded(split.files)
    other = Image.new("RGB", (40, 40), (7, 200, 90))
    for path in split.files:
        other.save(path, "JPEG")

    later = _epochs(ds, 2)

    assert all(sorted(epoch) == sorted(first) for epoch in later)
    kept = np.stack([np.frombuffer(b, np.float32).reshape(32, 32, 3) for b in first])
    gaps = np.abs(kept[:, None] - original[None]).max(axis=(2, 3, 4))  # each kept vs each file
    assert np.all(gaps.min(axis=1) <= 0.5) and np.all(gaps.min(axis=0) <= 0.5)
    assert not (tmp_path / "run").exists()  # under the limit: nothing spilled


def test_each_epoch_is_a_new_seeded_permutation_of_the_training_set(tmp_path):
    split = _training_split(tmp_path)
    cache = PixelCache(max_mb=64, path=str(tmp_path / "unused"))
    epochs = _epochs(image_dataset(split, 32, 5, shuffle=True, seed=3, cache=cache), 3)
    again = _epochs(image_dataset(split, 32, 5, shuffle=True, seed=3, cache=cache), 1)

    assert len(epochs[0]) == len(split) == len(set(epochs[0]))
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each in another order
    assert again[0] == epochs[0]  # the seed decides the orders


def test_spilled_pixels_are_those_kept_in_memory_in_a_file_of_the_run_dir(tmp_path):
    split = _training_split(tmp_path)
    run_dir = RunDir(str(tmp_path / "run"))

    def passes(max_mb: int) -> list[list[bytes]]:
        cache = PixelCache(max_mb=max_mb, path=run_dir.pixel_spill("train"))
        return _epochs(image_dataset(split, 32, 4, shuffle=True, seed=3, cache=cache), 2)

    in_memory, spilled = passes(64), passes(0)

    assert [sorted(epoch) for epoch in spilled] == [sorted(in_memory[0])] * 2
    assert spilled[0] != spilled[1]  # the spill file's epochs are shuffled too
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {("data", "train"), ("data", "test"), ("run", ".pixel_cache")}


def test_an_augmented_run_spilling_its_pixels_removes_the_spill(tmp_path, cfg, caplog):
    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=4)
    configure(cfg, f"data.train_dir={train_dir}", f"data.test_dir={test_dir}", "train.epochs=2")
    configure(cfg, "data.augment=true", "train.feature_cache_max_mb=0")
    with caplog.at_level(logging.INFO, logger="trainer"):
        metrics = run(cfg)

    assert metrics["fast_path"] is False
    assert "decoded images of train spilled to a tf.data cache file" in caplog.text
    assert "decoded images of test spilled to a tf.data cache file" in caplog.text
    assert not any(p.name == ".pixel_cache" for p in (tmp_path / "out").rglob("*"))
    assert (tmp_path / "out" / "_SUCCESS").exists()


def _files_of(images: list[bytes], original: np.ndarray) -> list[int]:
    """Which of the decoded `original` images each of `images` is (within the uint8 rounding)."""
    kept = np.stack([np.frombuffer(b, np.float32).reshape(original.shape[1:]) for b in images])
    gaps = np.abs(kept[:, None] - original[None]).max(axis=(2, 3, 4))
    assert np.all(gaps.min(axis=1) <= 0.5)
    return [int(i) for i in gaps.argmin(axis=1)]


def test_each_worker_decodes_only_its_own_share_once_and_trains_on_all_of_it(tmp_path):
    """shard=(2, i): the workers' files are disjoint and cover the set; each worker's stream
    goes over its own files again and again, each pass a new order, from the kept pixels."""
    split = _training_split(tmp_path)
    original = _decoded(split.files)
    streams = []
    for index in range(2):
        cache = PixelCache(max_mb=64, path=str(tmp_path / f"unused-{index}"))
        ds = image_dataset(split, 32, 2, shuffle=True, seed=3, shard=(2, index), cache=cache)
        streams.append(ds.unbatch().as_numpy_iterator())
    own = len(split) // 2
    first = [_files_of([next(s)[0].tobytes() for _ in range(own)], original) for s in streams]
    for path in split.files:
        Image.new("RGB", (40, 40), (7, 200, 90)).save(path, "JPEG")
    # Six more passes: more than the pipeline reads ahead (decoded before the files changed).
    later = [_files_of([next(s)[0].tobytes() for _ in range(6 * own)], original) for s in streams]

    assert sorted(first[0] + first[1]) == list(range(len(split)))
    for index in range(2):
        passes = [later[index][i : i + own] for i in range(0, 6 * own, own)]
        assert all(sorted(p) == sorted(first[index]) for p in passes)
        assert len({tuple(p) for p in [first[index], *passes]}) > 1  # new orders


def test_keras_epochs_after_the_first_never_read_the_files(tmp_path):
    """What the phases do, in small: Keras' fit over a training and a test pipeline whose files
    all become undecodable once epoch 1 ends; a later epoch that read one would fail."""
    import keras

    train_dir, test_dir = make_folders(tmp_path / "data", train=4, test=2)
    _, train, test = load_splits(str(train_dir), str(test_dir), 0.2, seed=0)
    run_dir = RunDir(str(tmp_path / "run"))

    def pipeline(split, name, **kw):
        cache = PixelCache(max_mb=64, path=run_dir.pixel_spill(name))
        return image_dataset(split, 32, 4, cache=cache, **kw)

    def break_files(epoch, logs):
        for path in train.files + test.files:
            Path(path).write_bytes(b"not an image any more")

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(
        pipeline(train, "train", shuffle=True, augment=True, seed=1),
        validation_data=pipeline(test, "test"),
        epochs=3,
        shuffle=False,  # the pipelines shuffle themselves, as trainer/train.py's fit says
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=break_files)],
    )

    assert len(history.history["val_loss"]) == 3
