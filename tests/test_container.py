"""The container: the Dockerfile lints clean, and the package it installs carries its configs."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile

from tests.conftest import REPO


def test_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_trainer_as_non_root_with_exec_form_entrypoint():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    assert any(line.startswith("FROM tensorflow/tensorflow:2.21.") for line in lines)
    assert 'ENTRYPOINT ["python", "-m", "trainer"]' in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")


def test_docker_context_leaves_out_data_outputs_and_git():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", "data", "outputs", "multirun", "runs"} <= ignored


def test_installed_wheel_runs_with_its_own_configs(tmp_path):
    """The image installs a wheel, not a checkout: `python -m trainer` must find trainer.conf."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "wheel").glob("trainer-*.whl"))
    assert "trainer/conf/experiment/demo.yaml" in zipfile.ZipFile(wheel).namelist()

    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [python, "-m", "trainer", "experiment=demo", "data.train_dir=somewhere", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "image_size: 64" in result.stdout and "weights: null" in result.stdout
    located = subprocess.run(
        [python, "-c", "import trainer; print(trainer.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(tmp_path / "venv") in located.stdout  # the wheel, not this checkout
