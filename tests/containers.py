"""Build and run the project's image without a Docker engine: debootstrap, buildah and podman.

The official base (tensorflow/tensorflow:2.21.0-gpu) cannot be pulled here, so a stand-in is
built once: Debian bookworm from the Debian mirror, its Python 3.11, and `tensorflow==2.21.*`
from the package index. The project's image is then built from the Dockerfile as it is, with
`--build-arg BASE_IMAGE=<stand-in>`. Everything lives in one container storage under pytest's
cache folder (.pytest_cache/d/container: ignored by git and by .dockerignore), so the stand-in
is built once per machine; delete that folder to start over.

Machine specifics (the Debian mirror, pip's index and CA bundle) are read here at test time,
from /etc/apt and pip's own configuration, and never committed.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("buildah", "podman", "debootstrap")
SUITE = "bookworm"  # Debian 12: Python 3.11, as in the official TensorFlow 2.21 image
DEFAULT_MIRROR = "http://deb.debian.org/debian"
OS_PACKAGES = "python3,python3-pip,python-is-python3,ca-certificates"
BASE_NAME = "localhost/trainer-stand-in-base"
# The stand-in for tensorflow/tensorflow:2.21.0-gpu, from Debian's OS image. The official
# image's pip installs system-wide (Debian's Python refuses, PEP 668: the marker goes) and it
# has `tensorflow` installed as that distribution, so `pip install .` finds it satisfied.
BASE_RECIPE = """\
FROM {os_image}
ENV LANG=C.UTF-8
COPY pip.conf /etc/pip.conf
{copy_ca}RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \\
    && python -m pip install --no-cache-dir "tensorflow==2.21.*"
"""
HOST_CA = "/etc/ssl/certs/stand-in-host-ca.crt"


def missing_tools() -> str | None:
    """Why the container tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "the container tests need root (debootstrap, and podman without user namespaces)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install -y {' '.join(absent)})"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources), for debootstrap."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs and Suites in one stanza
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:(.*)$", stanza, re.MULTILINE)
            if path.suffix == ".sources" and uris and suites and SUITE in suites[1].split():
                return uris[1]
        for line in text.splitlines():  # one-line style: deb [options] URI SUITE COMPONENTS
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if path.suffix == ".list" or path.name == "sources.list":
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return DEFAULT_MIRROR


def pip_setting(name: str) -> str | None:
    """pip's own value for `name` (index-url, cert): environment first, then its config files."""
    from_env = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if from_env:
        return from_env
    found = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (found.stdout.strip() or None) if found.returncode == 0 else None


@dataclass(frozen=True)
class Engine:
    """buildah and podman on one container storage under `root`, with the options this kind of
    machine needs (see `run_options`)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", self.root.resolve())  # podman wants absolute paths
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "graph"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )
        (self.root / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'  # no systemd in the machine
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.root / "run" / "events.log"}"\n'
            f'tmp_dir = "{self.root / "run" / "libpod"}"\n'
        )

    def env(self) -> dict:
        env = dict(os.environ)
        env["CONTAINERS_STORAGE_CONF"] = str(self.root / "storage.conf")
        env["CONTAINERS_CONF"] = str(self.root / "containers.conf")
        return env

    def run_options(self) -> list[str]:
        """For `podman run` and `buildah bud`. runc rather than crun: crun refuses hybrid
        cgroups (v1 and v2 mounted together, as here). Limits no higher than ours: root here
        lacks CAP_SYS_RESOURCE, and podman's defaults (1048576 files, processes) would need it;
        podman itself keeps at most kernel.pid_max processes."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], pid_max)
        runtime = ["--runtime", "runc"] if shutil.which("runc") else []
        limits = [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]
        return [*runtime, *limits]

    def command(self, tool: str, *args: str, timeout: float = 600, check: bool = True, **kw):
        """Run `tool args...` (buildah or podman) on this storage; output as text."""
        result = subprocess.run(
            [tool, *args], env=self.env(), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {result.stderr[-3000:]}")
        return result

    def exists(self, image: str) -> bool:
        """Whether the storage holds `image` (podman exits 1 for no, more for an error)."""
        found = self.command("podman", "image", "exists", image, check=False)
        if found.returncode not in (0, 1):
            raise RuntimeError(f"podman image exists {image}: {found.stderr[-3000:]}")
        return found.returncode == 0

    def size(self, image: str) -> int:
        """The image's size in bytes, all layers (podman's figure)."""
        shown = self.command("podman", "image", "inspect", "--format", "{{.Size}}", image)
        return int(shown.stdout.strip())

    def build(self, context: Path, *, tag: str, dockerfile: Path, build_args: dict) -> float:
        """`buildah bud` of `dockerfile` in `context`; the seconds it took."""
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        started = time.monotonic()
        self.command(
            "buildah",
            "bud",
            *self.run_options(),
            "--network=host",
            *args,
            "--file",
            str(dockerfile),
            "--tag",
            tag,
            str(context),
            timeout=3600,
        )
        return time.monotonic() - started


def base_key(*, mirror: str, index: str | None, ca: bytes | None) -> str:
    """What the stand-in depends on, hashed: a change builds a new one."""
    recipe = "\n".join([SUITE, OS_PACKAGES, BASE_RECIPE, mirror, index or "", ""])
    return hashlib.sha256(recipe.encode() + (ca or b"")).hexdigest()[:12]


def stand_in_base(engine: Engine) -> str:
    """The stand-in base image's name, built now unless the storage holds it already."""
    mirror, index = debian_mirror(), pip_setting("index-url")
    cert = pip_setting("cert")
    ca = Path(cert).read_bytes() if cert and Path(cert).is_file() else None
    key = base_key(mirror=mirror, index=index, ca=ca)
    name = f"{BASE_NAME}:{key}"
    if not engine.exists(name):
        _forget_stand_ins(engine, but=key)
        os_image = _debian_image(engine, mirror=mirror, tag=name.replace("-base:", "-os:"))
        with tempfile.TemporaryDirectory(dir=engine.root) as context:
            _write_base_context(Path(context), os_image=os_image, index=index, ca=ca)
            engine.build(
                Path(context), tag=name, dockerfile=Path(context) / "Containerfile", build_args={}
            )
    return name


def _forget_stand_ins(engine: Engine, *, but: str) -> None:
    """Stand-ins of another recipe or machine setting (2.5 GB each) go before a new one."""
    listed = engine.command("podman", "images", "--format", "{{.Repository}}:{{.Tag}}")
    for image in listed.stdout.split():
        if image.startswith("localhost/trainer-stand-in-") and not image.endswith(f":{but}"):
            engine.command("podman", "rmi", "--force", image, check=False)


def _debian_image(engine: Engine, *, mirror: str, tag: str) -> str:
    """Debian SUITE (minbase, plus Python) bootstrapped from `mirror`, imported as `tag`."""
    if engine.exists(tag):
        return tag
    with tempfile.TemporaryDirectory(dir=engine.root) as folder:
        rootfs = Path(folder) / "rootfs"
        bootstrap = [
            "debootstrap",
            "--variant=minbase",
            f"--include={OS_PACKAGES}",
            SUITE,
            str(rootfs),
            mirror,
        ]
        done = subprocess.run(bootstrap, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            engine.command("podman", "import", "-", tag, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
    return tag


def _write_base_context(context: Path, *, os_image: str, index: str | None, ca: bytes | None):
    """The stand-in's Containerfile, and the pip.conf that gives it this machine's package
    index (and CA bundle): the Dockerfile's `pip install .` then reaches the same index."""
    pip_conf = configparser.ConfigParser()
    pip_conf["global"] = {}
    if index:
        pip_conf["global"]["index-url"] = index
    copy_ca = ""
    if ca:
        (context / "host-ca.crt").write_bytes(ca)
        pip_conf["global"]["cert"] = HOST_CA
        copy_ca = f"COPY host-ca.crt {HOST_CA}\n"
    with open(context / "pip.conf", "w") as out:
        pip_conf.write(out)
    recipe = BASE_RECIPE.format(os_image=os_image, copy_ca=copy_ca)
    (context / "Containerfile").write_text(recipe)
