"""The container: the Dockerfile lints clean, and the package it installs carries its configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the image's build context holds (see .dockerignore): the package is built from a copy of
# these, so nothing (build/, *.egg-info) is written into the checkout.
PACKAGE_SOURCES = ["setup.py", "pyproject.toml", "README.md", "trainer", "conf", "hydra_plugins"]


def tool(name: str) -> str:
    """A command-line tool installed with this interpreter (the dev extra), even when its
    environment's bin/ is not on PATH; else whatever PATH finds."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of the package sources."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return next((root / "dist").glob("trainer-*.whl"))


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_trainer_as_non_root_with_exec_form_entrypoint():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    # the base is a build argument (tests build on a stand-in); users get the official image
    assert "ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu" in lines
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]
    assert 'ENTRYPOINT ["python", "-m", "trainer"]' in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")


def test_docker_context_leaves_out_data_outputs_and_git():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", "data", "outputs", "multirun", "runs"} <= ignored


def test_wheel_carries_every_config_of_the_checkout(wheel):
    """A wheel has no conf/ beside it: every config file must ship, unchanged, in trainer.conf."""
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            name[len("trainer/conf/") :]: archive.read(name)
            for name in archive.namelist()
            if name.startswith("trainer/conf/") and name.endswith(".yaml")
        }
    conf = REPO / "conf"
    in_checkout = {p.relative_to(conf).as_posix(): p.read_bytes() for p in conf.rglob("*.yaml")}
    assert sorted(shipped) == sorted(in_checkout)
    assert shipped == in_checkout


def test_installed_wheel_runs_with_its_own_configs(wheel, tmp_path):
    """The image installs a wheel, not a checkout: `python -m trainer` and the `trainer` console
    script must run from the installed package with its trainer.conf. Installed with --target
    into a folder and run by this very interpreter, so it works the same in a venv, a conda env
    or the system Python; the checkout is not importable (cwd elsewhere, PYTHONPATH only the
    folder, which comes before any editable install of the checkout)."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    show_job = ["experiment=demo", "data.train_dir=somewhere", "--cfg", "job"]

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, capture_output=True, text=True, cwd=cwd, env=env, timeout=120
        )

    located = run(sys.executable, "-c", "import trainer; print(trainer.__file__)")
    assert located.stdout.strip() == str(target / "trainer" / "__init__.py"), located.stderr
    for command in ([sys.executable, "-m", "trainer"], [str(target / "bin" / "trainer")]):
        result = run(*command, *show_job)
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
        assert "image_size: 64" in result.stdout and "weights: null" in result.stdout
    assert not list(cwd.iterdir())  # --cfg job runs nothing and writes nothing


def test_wheel_carries_the_kubernetes_launcher_that_hydra_finds(wheel):
    """`hydra/launcher=kubernetes` from an installed package: Hydra discovers launchers in the
    hydra_plugins namespace package, so the wheel must ship it (without an __init__.py there)."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    plugin = "hydra_plugins/trainer_kubernetes_launcher/"
    assert f"{plugin}__init__.py" in names and f"{plugin}kubernetes_launcher.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package: other plugins too
