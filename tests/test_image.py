"""The image, built from the Dockerfile and run as the Kubernetes Job runs it.

Built with buildah on a stand-in base (tests/containers.py: Debian bookworm, Python 3.11,
tensorflow 2.21 from the package index), since the official GPU image cannot be pulled here;
run with podman as the rendered Job's pod: uid 10001, read-only root filesystem, no privileges,
its working dir, environment and emptyDir volumes (trainer/kube.py). The data is mounted
read-only at /data; a host folder mounted at /bucket stands for the gs:// output.dir, as it
outlives the pod. `pytest -m container` (root, buildah, podman, debootstrap); skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import containers
from tests.conftest import (
    REPO,
    Lines,
    last_error_line,
    run_module,
    start_trainer,
    stop,
    stopped_on_exit,
)
from trainer import kube

WHY_NOT = containers.missing_tools()
pytestmark = [pytest.mark.container, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

TEST_IMAGE = f"localhost/trainer-under-test:{os.getpid()}"
MB = 1e6
_names = itertools.count()


@dataclass(frozen=True)
class Built:
    """The project's image and its stand-in base, with what the build cost."""

    engine: containers.Engine
    name: str
    base: str
    seconds: float


@pytest.fixture(scope="module")
def image(request, tmp_path_factory) -> Built:
    """The Dockerfile built as it is (FETCH_WEIGHTS=0: no download from outside the index) on
    the stand-in base, with the checkout as its context (.dockerignore applies); removed after."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("container") if cache else tmp_path_factory.mktemp("container")
    engine = containers.Engine(Path(root))
    base = containers.stand_in_base(engine)
    try:
        seconds = engine.build(
            REPO,
            tag=TEST_IMAGE,
            dockerfile=REPO / "Dockerfile",
            build_args={"BASE_IMAGE": base, "FETCH_WEIGHTS": "0"},
        )
        yield Built(engine, TEST_IMAGE, base, seconds)
    finally:
        engine.command("podman", "rmi", "--force", TEST_IMAGE, check=False)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """`python -m trainer.synthetic` output, readable by the pod's user (pytest's folders are
    0700, and a bind mount keeps the mode)."""
    root = tmp_path_factory.mktemp("demo")
    made = run_module("trainer.synthetic", str(root / "data"), cwd=root, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    for folder in [root / "data", *(p for p in (root / "data").rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
    return root / "data"


@pytest.fixture
def bucket(tmp_path) -> Path:
    """Where output.dir points (/bucket): it outlives a pod, as a gs:// folder does."""
    return _pod_folder(tmp_path / "bucket")


def pod_options(*, volumes: Path) -> list[str]:
    """`podman run` options for what the rendered Job gives its pod (trainer/kube.py): its user
    and group, read-only root filesystem, no privilege escalation, no capabilities, working dir
    and environment; its emptyDir volumes as new folders under `volumes` (tmpfs for medium
    Memory). Read from the manifest, so a change there changes what is tested here."""
    job = kube.job(
        name="image-test", image=TEST_IMAGE, points=[[]], sweep=False, res=kube.Resources(gpus=0)
    )
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    user, security = pod["securityContext"], container["securityContext"]
    options = [
        f"--user={user['runAsUser']}:{user['runAsGroup']}",
        f"--group-add={user['fsGroup']}",
        f"--workdir={container['workingDir']}",
        *(f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]),
        *(f"--env={var['name']}={var['value']}" for var in container["env"]),
    ]
    if security["readOnlyRootFilesystem"]:
        options += ["--read-only", "--read-only-tmpfs=false"]  # only the pod's own volumes
    if not security["allowPrivilegeEscalation"]:
        options.append("--security-opt=no-new-privileges")
    empty_dirs = {volume["name"]: volume["emptyDir"] for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        path = mount["mountPath"]
        if empty_dirs[mount["name"]].get("medium") == "Memory":
            options.append(f"--mount=type=tmpfs,destination={path}")
        else:
            folder = _pod_folder(volumes / mount["name"], group=user["fsGroup"])
            options.append(f"--volume={folder}:{path}")
    return options


def _pod_folder(folder: Path, group: int = 10001) -> Path:
    """A new folder as the kubelet makes an emptyDir with fsGroup: world-writable, the pod's
    group, setgid."""
    folder.mkdir(parents=True)
    os.chown(folder, 0, group)
    folder.chmod(0o2777)
    return folder


def podman_run(built: Built, *args: str, options: list[str], entrypoint: str | None = None):
    """The `podman run` command line: no network (nothing may be downloaded at run time), the
    image's entrypoint unless `entrypoint` is given, `args` after the image."""
    name = f"trainer-test-{os.getpid()}-{next(_names)}"
    chosen = [f"--entrypoint={entrypoint}"] if entrypoint else []
    command = ["podman", "run", "--rm", f"--name={name}", "--network=none"]
    command += [*built.engine.run_options(), *options, *chosen, built.name, *args]
    return name, command


def run_in_pod(built: Built, *args: str, options: list[str], entrypoint=None, timeout=600):
    """Run the container to its end; the CompletedProcess (text). Removed on every way out."""
    name, command = podman_run(built, *args, options=options, entrypoint=entrypoint)
    try:
        return subprocess.run(
            command, env=built.engine.env(), capture_output=True, text=True, timeout=timeout
        )
    finally:
        _remove(built, name)


@contextlib.contextmanager
def started_in_pod(built: Built, *args: str, options: list[str], stderr: Path):
    """The container started attached (stdout piped, stderr to the file `stderr`); yields
    (container name, process); stopped and removed on every way out."""
    name, command = podman_run(built, *args, options=options)
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            command, env=built.engine.env(), stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        yield name, process
    finally:
        _remove(built, name)
        stop(process)


def _remove(built: Built, name: str) -> None:
    built.engine.command("podman", "rm", "--force", "--time=0", "--ignore", name, check=False)


def data_options(data: Path) -> list[str]:
    return [f"--volume={data}:/data:ro"]


DEMO_DATA = ["data.train_dir=/data/train", "data.test_dir=/data/test"]


# -- the image -------------------------------------------------------------------------------


def test_image_adds_the_project_to_the_base_not_a_second_tensorflow(image):
    """The Dockerfile's `pip install .` finds the base's TensorFlow 2.21 and keeps it: the
    project adds megabytes, where a second TensorFlow would add over a gigabyte."""
    over = image.engine.size(image.name) - image.engine.size(image.base)
    print(f"image: {over / MB:.0f} MB over the base, built in {image.seconds:.0f} s")
    assert 0 < over < 300 * MB
    shown = run_in_pod(
        image,
        "-c",
        "import importlib.metadata as m; print(m.version('tensorflow'), m.version('trainer'))",
        options=[],
        entrypoint="python",
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert re.fullmatch(r"2\.21\.\d+ 0\.1\.0", shown.stdout.strip())


def test_image_runs_the_installed_package_and_holds_no_tests(image):
    """Run without a pod spec (`docker run IMAGE`), the image is non-root in /scratch; it
    imports the installed package (not /opt/trainer, the copied sources), and neither holds a
    test file: .dockerignore and the COPY lines keep them out."""
    script = (
        "import importlib.metadata as m, os, trainer\n"
        "print(os.getuid(), os.getgid(), os.getcwd())\n"
        "print(trainer.__file__)\n"
        "print(*(str(f) for f in m.files('trainer')), sep='\\n')\n"
        "print(*(os.path.join(d, f) for d, _, fs in os.walk('/opt/trainer') for f in fs),"
        " sep='\\n')\n"
    )
    shown = run_in_pod(image, "-c", script, options=[], entrypoint="python")
    assert shown.returncode == 0, shown.stderr[-2000:]
    user, location, *files = shown.stdout.splitlines()
    assert user == "10001 10001 /scratch"
    assert "-packages/trainer/__init__.py" in location and not location.startswith("/opt/")
    assert any(f.startswith("/opt/trainer/trainer/") for f in files)  # the listing is real
    tests = [f for f in files if re.search(r"(^|/)(tests/|test_[^/]*\.py$|conftest\.py$)", f)]
    assert tests == []


# -- the image as the Job's pod --------------------------------------------------------------


def test_demo_in_the_jobs_pod_exports_and_predict_reads_the_export(
    image, demo_data, bucket, tmp_path
):
    """`experiment=demo` as the pod runs it ends with exit 0 and _SUCCESS, with the configs of
    the installed package; `python -m trainer.predict` in the image reads the export."""
    options = pod_options(volumes=tmp_path / "pod") + data_options(demo_data)
    options.append(f"--volume={bucket}:/bucket")
    result = run_in_pod(
        image, "experiment=demo", *DEMO_DATA, "output.dir=/bucket/demo", options=options
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (bucket / "demo" / "_SUCCESS").exists()
    assert (bucket / "demo").stat().st_uid == 10001  # written by the pod's user
    hydra = yaml.safe_load((bucket / "demo" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main = [s for s in hydra["runtime"]["config_sources"] if s["provider"] == "main"]
    assert main == [{"path": "trainer.conf", "schema": "pkg", "provider": "main"}]

    predicted = run_in_pod(
        image,
        "-m",
        "trainer.predict",
        "/bucket/demo",
        "/data/test",
        options=pod_options(volumes=tmp_path / "pod2")
        + data_options(demo_data)
        + [f"--volume={bucket}:/bucket:ro"],
        entrypoint="python",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = [line.split("\t") for line in predicted.stdout.splitlines()]
    images = sorted(str(p) for p in (demo_data / "test").rglob("*.*"))
    assert len(lines) == len(images) > 0
    assert {line[1] for line in lines} <= {p.name for p in (demo_data / "test").iterdir()}


def test_sigterm_to_pid_1_leaves_a_backup_and_exit_143_and_a_new_pod_resumes(
    image, demo_data, bucket, tmp_path
):
    """Preemption: Kubernetes sends SIGTERM to the container's PID 1, which is python itself
    (exec-form entrypoint; PID 1 ignores signals it has no handler for). The run writes its
    backup to output.dir and exits 143; a new pod (fresh emptyDirs) resumes from it."""
    args = [
        "experiment=demo",
        *DEMO_DATA,
        "output.dir=/bucket/run",
        "data.augment=true",  # the backbone runs every step: epochs of seconds
        "train.epochs=4",
        "train.backup_every_steps=2",
    ]
    options = data_options(demo_data) + [f"--volume={bucket}:/bucket"]
    first = pod_options(volumes=tmp_path / "pod1") + options
    with started_in_pod(image, *args, options=first, stderr=tmp_path / "stderr.txt") as (
        name,
        process,
    ):
        lines = Lines(process)
        lines.wait_for("epoch 2/4", timeout=600)
        killed = image.engine.command("podman", "kill", "--signal=TERM", name, check=False)
        assert killed.returncode == 0, killed.stderr
        process.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 143, stderr[-3000:]
    assert "to resume, run: python -m trainer " in last_error_line_of(stderr)
    assert last_error_line_of(stderr).endswith(" output.dir=/bucket/run")
    backup = bucket / "run" / "backup" / "head" / "training_metadata.json"
    metadata = json.loads(backup.read_text())
    assert not (bucket / "run" / "_SUCCESS").exists()

    second = run_in_pod(image, *args, options=pod_options(volumes=tmp_path / "pod2") + options)

    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at epoch {metadata['epoch'] + 1}" in second.stdout
    assert "epoch 1/4" not in second.stdout and "epoch 4/4" in second.stdout
    assert (bucket / "run" / "_SUCCESS").exists() and not (bucket / "run" / "backup").exists()


def last_error_line_of(stderr: str) -> str:
    """The line a user reads, from stderr written to a file."""
    return last_error_line(subprocess.CompletedProcess([], 0, "", stderr))


def test_missing_data_exits_2_with_its_one_line(image, tmp_path):
    """No data mounted: exit 2 (the Job fails at once, no retries) and one line naming it."""
    result = run_in_pod(image, "experiment=demo", options=pod_options(volumes=tmp_path / "pod"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_error_line(result) == (
        "trainer: error: data.train_dir=data/demo/train: folder not found"
    )
    assert "Traceback" not in result.stderr


def test_start_up_to_the_first_epoch_against_a_bare_start(image, demo_data, bucket, tmp_path):
    """What the container costs at start: seconds from launch to the first epoch's line, in the
    pod (podman run) and as a bare `python -m trainer` here, on the same data and config."""
    args = ["experiment=demo", "train.epochs=1"]
    options = pod_options(volumes=tmp_path / "pod") + data_options(demo_data)
    options.append(f"--volume={bucket}:/bucket")
    started = time.monotonic()
    with started_in_pod(
        image,
        *args,
        *DEMO_DATA,
        "output.dir=/bucket/timed",
        options=options,
        stderr=tmp_path / "pod-stderr.txt",
    ) as (_, process):
        pod_seconds = _seconds_to_first_epoch(process, started)
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    started = time.monotonic()
    bare_data = [f"data.train_dir={demo_data / 'train'}", f"data.test_dir={demo_data / 'test'}"]
    process = start_trainer(*args, *bare_data, f"output.dir={bare_dir / 'out'}", cwd=bare_dir)
    with stopped_on_exit(process):
        bare_seconds = _seconds_to_first_epoch(process, started)
    print(f"start-up to the first epoch: {pod_seconds:.1f} s in the pod, {bare_seconds:.1f} s bare")
    assert pod_seconds < bare_seconds + 20


def _seconds_to_first_epoch(process: subprocess.Popen, started: float) -> float:
    """Seconds from `started` to the first epoch's line; the run must then end well."""
    lines = Lines(process)
    lines.wait_for("epoch 1/", timeout=600)
    seconds = time.monotonic() - started
    assert process.wait(timeout=300) == 0, lines.text()[-3000:]
    return seconds
