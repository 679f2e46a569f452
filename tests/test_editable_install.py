"""The documented install, `pip install -e ".[kubernetes,optuna]"`, as a user meets it: in a
fresh environment, then `python -m trainer` from a folder other than the checkout. Hydra finds
launchers by walking the `hydra_plugins` namespace package with pkgutil, which does not see
packages that setuptools' editable finder serves (a known Hydra issue,
Hydra issue 2359); a run from the checkout itself hides that, as the current folder is
on sys.path there.

Fast and offline: the fresh venv has no pip of its own and borrows this environment's installed
packages (a .pth line), the current pip installs into it (`--python`) with --no-deps and no build
isolation. Only a copy of the source is installed, so the checkout gets no trainer.egg-info.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = ["trainer", "hydra_plugins", "conf", "setup.py", "pyproject.toml", "README.md"]


def test_the_kubernetes_launcher_is_found_from_any_folder_after_an_editable_install(tmp_path):
    source = tmp_path / "checkout"
    for name in SOURCE:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This environment's packages (TensorFlow, Hydra, setuptools), without its own .pth files:
    # the trainer is the fresh install's only.
    Path(site, "installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-build-isolation", "--no-index", "--no-cache-dir", "-q"]
        + ["-e", f"{source}[kubernetes,optuna]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def trainer(*args: str) -> str:
        result = subprocess.run(
            [str(python), "-m", "trainer", *args],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    located = trainer("--info", "plugins")
    assert "KubernetesLauncher" in located.split("Launcher:", 1)[1].split("Sweeper:")[0]
    assert (
        str(source / "hydra_plugins")
        in subprocess.run(
            [str(python), "-c", "import hydra_plugins; print(list(hydra_plugins.__path__))"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
    )
    launcher = trainer("hydra/launcher=kubernetes", "--cfg", "hydra", "--package", "hydra.launcher")
    assert "kubernetes_launcher.KubernetesLauncher" in launcher
    assert os.listdir(elsewhere) == []  # nothing written where it ran
