"""`python -m trainer.predict`: one line per image, bad input named with exit code 2.

Its `main(argv)` runs in this process (what the command's start-up prints is checked through a
real process in tests/test_cli.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import CLASSES, last_error_line
from trainer.predict import main


def predict(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m trainer.predict args...` as main(argv): its exit code and output."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["trainer.predict", *args], code, out, err)


def test_predict_prints_path_class_and_probability_per_image(trained_run, capsys):
    one = sorted(trained_run.test_dir.glob("cat/*.jpg"))[0]
    result = predict(capsys, str(trained_run.out), str(one), str(trained_run.test_dir / "dog"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(lines) == 1 + 16
    assert lines[0][0] == str(one) and lines[0][1] == "cat"
    dogs = [cls for _, cls, _ in lines[1:]]
    assert dogs.count("dog") >= 15
    # Each line's class and probability are the model's own answer for that file.
    serve = tf.saved_model.load(str(trained_run.out / "saved_model")).signatures["serving_default"]
    out = serve(image_bytes=tf.constant([Path(path).read_bytes() for path, _, _ in lines]))
    probabilities = out["probabilities"].numpy()
    for (_, cls, p), row in zip(lines, probabilities, strict=True):
        assert cls == CLASSES[row.argmax()] and float(p) == pytest.approx(row.max(), abs=1e-4)


def test_predict_pairs_each_path_with_its_own_result_in_the_order_given(trained_run, capsys):
    """`predict out dog.jpg cat.jpg`: arguments not in sorted order still get their own class
    on their own line, in the order given."""
    from trainer import predict

    serve = tf.saved_model.load(str(trained_run.out / "saved_model")).signatures["serving_default"]

    def answer(path: Path) -> tuple[str, float]:
        out = serve(image_bytes=tf.constant([path.read_bytes()]))
        return out["class_name"].numpy()[0].decode(), float(out["probabilities"].numpy().max())

    # The first test image of each class the model gets right, dog's first: unsorted paths.
    dog, cat = (
        next(p for p in sorted(trained_run.test_dir.glob(f"{c}/*.jpg")) if answer(p)[0] == c)
        for c in ("dog", "cat")
    )
    predict.main([str(trained_run.out), str(dog), str(cat)])

    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(path, name) for path, name, _ in lines] == [(str(dog), "dog"), (str(cat), "cat")]
    for (path, _, probability), image in zip(lines, (dog, cat), strict=True):
        assert float(probability) == pytest.approx(answer(image)[1], abs=1e-4), path


def test_predict_reports_a_bad_image_and_classifies_the_rest(trained_run, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"nope")
    good = sorted(trained_run.test_dir.glob("dog/*.jpg"))[0]
    result = predict(capsys, str(trained_run.out / "saved_model"), str(bad), str(good))
    assert result.returncode == 2
    assert f"{bad}: cannot decode image" in result.stderr
    assert result.stdout.startswith(f"{good}\tdog\t")


def test_predict_names_a_missing_model_dir(tmp_path, capsys):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    result = predict(capsys, str(tmp_path / "nomodel"), str(image))
    assert result.returncode == 2
    assert str(tmp_path / "nomodel") in last_error_line(result)
