"""README's first command: generate the built-in demo data, run experiment=demo."""

from __future__ import annotations

import json

from tests.conftest import run_module, run_trainer


def test_readme_demo_generates_data_trains_and_says_where_outputs_are(tmp_path):
    made = run_module(
        "trainer.synthetic", "data/demo", "--train", "80", "--test", "32", cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    result = run_trainer("experiment=demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1  # Hydra's run directory is the default output.dir
    out = runs[0]
    assert (out / "_SUCCESS").exists()
    assert f"exported to {out}/saved_model" in result.stdout
    assert f"tensorboard --logdir {out}/tensorboard" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] >= 0.95
