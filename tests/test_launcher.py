"""`hydra/launcher=kubernetes` against a real Kubernetes control plane (API server and Job
controller, v1.36), with tests/kubelet.py playing the kubelet: it runs each pod's command as a
local process, the trainer on tiny data with every path on a GCS emulator.

The control plane is ../shared/k8s/control-plane.sh (beside the repository, as in CI); these tests
skip, saying why, where it, etcd or kubectl is missing. TRAINER_TEST_KUBECONFIG points them at
another cluster instead (its API server must let a test register a Node and bind pods to it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_folders, trainer_env
from tests.kubelet import Kubelet, wait_for

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures
pytestmark = [
    pytest.mark.cluster,
    # the local control plane's kubeconfig skips TLS verification, which urllib3 warns about
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

REPO = Path(__file__).resolve().parents[1]
CONTROL_PLANE = REPO.parent / "shared" / "k8s" / "control-plane.sh"
IMAGE = "trainer-test:local"  # the image name the test kubelet runs as `python -m trainer`
SMALL = ["data.image_size=32", "data.batch_size=16", "model.weights=null", "train.epochs=1"]


# -- the cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory) -> Path:
    """A kubeconfig for a running API server: TRAINER_TEST_KUBECONFIG's, or a local control
    plane started for this session and stopped at its end."""
    pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")
    if os.environ.get("TRAINER_TEST_KUBECONFIG"):
        yield Path(os.environ["TRAINER_TEST_KUBECONFIG"])
        return
    missing = [
        what
        for what, present in (
            (str(CONTROL_PLANE), CONTROL_PLANE.is_file()),
            ("etcd (apt-get install etcd-server)", shutil.which("etcd")),
            ("kubectl", shutil.which("kubectl")),
        )
        if not present
    ]
    if missing:
        pytest.skip(f"no Kubernetes control plane: missing {', '.join(missing)}")
    folder = tmp_path_factory.mktemp("control-plane")
    try:
        started = subprocess.run(
            ["bash", str(CONTROL_PLANE), "start", str(folder)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, started.stderr[-2000:]
        yield folder / "kubeconfig"
    finally:
        _kill_control_plane(folder)
        subprocess.run(["bash", str(CONTROL_PLANE), "stop", str(folder)], timeout=120)


def _kill_control_plane(folder: Path) -> None:
    """SIGKILL the processes `control-plane.sh start` recorded in `folder`/pids: this throwaway
    cluster needs no graceful shutdown, which takes the API server 10-30 s. The script's `stop`
    then finds them gone and tidies up."""
    pids = folder / "pids"
    for pid in pids.read_text().split() if pids.exists() else []:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, ValueError):  # ours (the session's subreaper)
            os.waitpid(int(pid), 0)


@pytest.fixture(scope="session")
def api(kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def new_namespace(api) -> str:
    """A fresh namespace with the pods' service account, as a user sets it up once."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_service_account(name, {"metadata": {"name": "trainer"}})
    return name


def delete_namespace(api, name: str) -> None:
    from kubernetes import client

    client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture
def namespace(api):
    name = new_namespace(api)
    yield name
    delete_namespace(api, name)


def kubeconfig_for(api, namespace: str, account: str, path: Path, rules: list | None) -> Path:
    """A kubeconfig that acts as service account `account`, granted `rules` in `namespace`."""
    from kubernetes import client

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": account}})
    if rules is not None:
        rbac.create_namespaced_role(namespace, {"metadata": {"name": account}, "rules": rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": account},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": account,
                },
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            },
        )
    token = core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    server = api.configuration.host
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "c",
                        "context": {"cluster": "c", "user": account, "namespace": namespace},
                    }
                ],
                "current-context": "c",
            }
        )
    )
    return path


def jobs(api, namespace: str) -> list:
    from kubernetes import client

    items = client.BatchV1Api(api).list_namespaced_job(namespace).items
    return sorted(items, key=lambda j: j.metadata.creation_timestamp)


def pods_by_index(api, namespace: str, job: str) -> dict[int, list]:
    from kubernetes import client

    pods = (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
        .items
    )
    found: dict[int, list] = {}
    for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp):
        index = int(pod.metadata.annotations["batch.kubernetes.io/job-completion-index"])
        found.setdefault(index, []).append(pod)
    return found


# -- data, the kubelet and the driver ------------------------------------------------------------


@pytest.fixture(scope="session")
def bucket(emulator, tmp_path_factory) -> str:
    """A bucket with the tiny two-class dataset under data/train and data/test."""
    name = f"sweeps-{uuid.uuid4().hex[:8]}"
    emulator.client().create_bucket(name)
    train, test = make_folders(tmp_path_factory.mktemp("sweep-data"), train=16, test=8)
    emulator.upload_dir(train, f"gs://{name}/data/train")
    emulator.upload_dir(test, f"gs://{name}/data/test")
    return name


def kubelet(api, namespace: str, root: Path, emulator, preempt=(), oom=()) -> Kubelet:
    """The test kubelet for `namespace`: it runs IMAGE's entrypoint, `python -m trainer`
    (Dockerfile's ENTRYPOINT), with this checkout's code and the emulator as GCS."""
    return Kubelet(
        api=api,
        namespace=namespace,
        root=root,
        entrypoints={IMAGE: [sys.executable, "-m", "trainer"]},
        env=trainer_env(STORAGE_EMULATOR_HOST=emulator.url),
        preempt=set(preempt),
        oom=set(oom),
    )


def driver_command(bucket: str, output: str, namespace: str, sweep_dir: Path, *overrides: str):
    return [
        sys.executable,
        "-m",
        "trainer",
        "-m",
        "hydra/launcher=kubernetes",
        f"hydra.launcher.image={IMAGE}",
        f"hydra.launcher.namespace={namespace}",
        "hydra.launcher.poll_seconds=5",
        f"hydra.sweep.dir={sweep_dir}",
        f"data.train_dir=gs://{bucket}/data/train",
        f"data.test_dir=gs://{bucket}/data/test",
        f"output.dir={output}",
        *SMALL,
        *overrides,
    ]


def run_driver(command, kubeconfig: Path, emulator, cwd: Path, timeout=600):
    """Run the sweep's driver as a user does; the CompletedProcess."""
    env = trainer_env(KUBECONFIG=str(kubeconfig), STORAGE_EMULATOR_HOST=emulator.url)
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def gcs_names(emulator, uri: str) -> set[str]:
    return set(emulator.names(uri))


def summary_rows(emulator, uri: str) -> list[dict]:
    """sweep.csv at the sweep's gs:// root, one dict a point, in point order."""
    import csv
    import io

    bucket, _, prefix = uri[len("gs://") :].partition("/")
    text = emulator.client().bucket(bucket).blob(f"{prefix}/sweep.csv").download_as_text()
    return sorted(csv.DictReader(io.StringIO(text)), key=lambda row: int(row["point"]))


def documented_rules() -> list[dict]:
    """The rules of the Role docs/kubernetes-launcher.md tells users to ask for."""
    text = (REPO / "docs" / "kubernetes-launcher.md").read_text()
    (role,) = [
        document
        for block in text.split("```yaml")[1:]
        if (document := yaml.safe_load(block.split("```")[0])).get("kind") == "Role"
    ]
    return role["rules"]


# -- a grid with a bad point and a preemption ----------------------------------------------------


class Grid:
    """One 5-point grid sweep (point 3 has a bad value; point 1's first pod is preempted; every
    pod of point 4 is OOM-killed) run through the launcher as a service account holding only the
    launcher's documented Role."""

    def __init__(self, api, namespace, kubeconfig, output, sweep_dir, command, result, kubelet):
        self.api, self.namespace, self.kubeconfig = api, namespace, kubeconfig
        self.output, self.sweep_dir, self.command = output, sweep_dir, command
        self.result, self.kubelet = result, kubelet


@pytest.fixture(scope="module")
def grid(api, emulator, bucket, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    namespace = new_namespace(api)
    config = kubeconfig_for(api, namespace, "launcher", root / "kubeconfig", documented_rules())
    output = f"gs://{bucket}/grid-{namespace}"
    command = driver_command(
        bucket, output, namespace, root / "sweep", "model.dropout=0.1,0.2,0.3,1.5,0.4"
    )
    try:
        with kubelet(api, namespace, root / "node", emulator, preempt={1}, oom={4}) as node:
            result = run_driver(command, config, emulator, cwd=root)
        yield Grid(api, namespace, config, output, root / "sweep", command, result, node)
    finally:
        delete_namespace(api, namespace)


def test_a_point_that_exits_2_fails_alone_and_the_summary_shows_all_five(grid, emulator):
    result = grid.result
    print(result.stdout)  # the sweep's summary table, for the record (pytest -s)
    assert result.returncode == 2, result.stderr[-3000:]
    (job,) = jobs(grid.api, grid.namespace)
    assert job.spec.completions == 5
    assert job.status.completed_indexes == "0-2"
    assert job.status.failed_indexes == "3,4"
    rows = summary_rows(emulator, grid.output)
    assert [(r["point"], r["status"], r["exit_code"]) for r in rows] == [
        ("0", "ok", "0"),
        ("1", "ok", "0"),
        ("2", "ok", "0"),
        ("3", "failed", "2"),
        ("4", "failed", "137"),
    ]
    # Only the swept key: not the constant gs:// paths, which the sweeper hands over escaped
    assert [r["overrides"] for r in rows] == [
        f"model.dropout={v}" for v in ("0.1", "0.2", "0.3", "1.5", "0.4")
    ]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows[:3])
    # The failed point's own error line, read back through the pods/log API, names the key.
    assert "model.dropout=1.5" in result.stderr
    assert "must be in [0, 1)" in result.stderr
    for point in range(3):
        assert "_SUCCESS" in gcs_names(emulator, f"{grid.output}/{point}")
    assert "_SUCCESS" not in gcs_names(emulator, f"{grid.output}/3")
    # Each failed point is one line, the promised one, not also Hydra's own report
    reported = [line for line in result.stderr.splitlines() if line.startswith("sweep point")]
    assert [line.split(" exit ", 1)[0] for line in reported] == [
        "sweep point 3 [model.dropout=1.5]",
        "sweep point 4 [model.dropout=0.4]",
    ]
    assert "Error executing job" not in result.stderr
    # The OOM kill is said as the kubelet reported it, not only by the log's last line
    assert reported[1].startswith("sweep point 4 [model.dropout=0.4] exit 137: pod ") and reported[
        1
    ].endswith(
        "ended OOMKilled (exit 137, SIGKILL): over its memory limit, hydra.launcher.memory=32Gi;"
        " its last log line: Epoch 1/1 (the test kubelet OOM-kills this pod)"
    )


def _ran(pods) -> float:
    return sum(
        (s.state.terminated.finished_at - s.state.terminated.started_at).total_seconds()
        for p in pods
        for s in p.status.container_statuses
    )


def test_a_preempted_pod_is_replaced_and_its_point_still_finishes(grid, emulator):
    (job,) = jobs(grid.api, grid.namespace)
    by_index = pods_by_index(grid.api, grid.namespace, job.metadata.name)
    first, *others = by_index[1]
    assert grid.kubelet.preempted_pods == [first.metadata.name]
    assert any(c.type == "DisruptionTarget" for c in first.status.conditions)
    assert [p.status.phase for p in others] == ["Succeeded"]
    # point 3's pod and point 4's three (a crash is retried twice); the preemption is ignored
    assert job.status.failed == 1 + 3
    assert len(grid.kubelet.oom_killed_pods) == 3
    assert "_SUCCESS" in gcs_names(emulator, f"{grid.output}/1")
    # A point's seconds are all its pods' run time: the preempted pod's too
    rows = summary_rows(emulator, grid.output)
    for point in (1, 4):
        assert len(by_index[point]) > 1
        assert float(rows[point]["wall_seconds"]) == pytest.approx(_ran(by_index[point]), abs=0.1)


def test_a_rerun_skips_finished_points_and_resubmits_the_rest(grid, emulator, tmp_path):
    before = summary_rows(emulator, grid.output)
    with kubelet(grid.api, grid.namespace, tmp_path / "node", emulator) as node:
        rerun = run_driver(grid.command, grid.kubeconfig, emulator, cwd=tmp_path)
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    first, second = jobs(grid.api, grid.namespace)
    assert second.spec.completions == 2  # only points 3 and 4 ran again
    env = {var.name: var.value for var in second.spec.template.spec.containers[0].env}
    point, _ = json.loads(env["TRAINER_SWEEP"])
    assert point[-1] == f"output.dir={grid.output.replace(':', chr(92) + ':')}/3"
    assert len(node.started_pods) == 2
    rows = summary_rows(emulator, grid.output)
    assert [(r["point"], r["status"]) for r in rows] == [
        ("0", "ok"),
        ("1", "ok"),
        ("2", "ok"),
        ("3", "failed"),
        ("4", "ok"),  # no OOM kill this time
    ]
    # A skipped point keeps the seconds its run took, not 0
    assert [r["wall_seconds"] for r in rows[:3]] == [r["wall_seconds"] for r in before[:3]]
    # Every point that trained has its seconds. Point 3 (a config error) is left out: Kubernetes
    # records startedAt/finishedAt in whole seconds, so a pod that fails within one shows 0.
    assert all(float(rows[point]["wall_seconds"]) > 0 for point in (0, 1, 2, 4))


# -- Optuna --------------------------------------------------------------------------------------


@pytest.mark.slow  # two batches of Jobs with trainer pods
def test_optuna_sweep_runs_one_job_per_batch_and_the_study_gets_every_accuracy(
    api, namespace, kubeconfig, emulator, bucket, tmp_path
):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="pip install 'trainer[optuna]'"
    )
    output = f"gs://{bucket}/optuna-{namespace}"
    command = driver_command(
        bucket,
        output,
        namespace,
        tmp_path / "sweep",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.direction=maximize",
        "model.dropout=interval(0.0, 0.5)",
        "train.learning_rate=tag(log, interval(1e-4, 1e-2))",
    )
    with kubelet(api, namespace, tmp_path / "node", emulator):
        result = run_driver(command, kubeconfig, emulator, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the sweep's summary table, for the record (pytest -s)
    assert [j.spec.completions for j in jobs(api, namespace)] == [2, 2]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    rows = summary_rows(emulator, output)
    accuracies = [float(r["test_accuracy"]) for r in rows]
    assert [r["point"] for r in rows] == ["0", "1", "2", "3"]
    assert best["best_value"] == pytest.approx(max(accuracies))


# -- stopping, and errors before any Job ---------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "repeats"),
    [  # the repeated Ctrl-C (the hardest case) in the default run, the others in the slow one
        pytest.param(signal.SIGINT, 1, id="ctrl-c", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, 1, id="sigterm", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 20, id="ctrl-c-again-and-again"),
        pytest.param(signal.SIGTERM, 20, id="sigterm-to-the-group-again", marks=pytest.mark.slow),
    ],
)
def test_an_interrupted_driver_says_why_pods_wait_and_leaves_no_job_behind(
    api, namespace, kubeconfig, emulator, bucket, tmp_path, signum, repeats
):
    """One signal, or a burst 15 ms apart (Ctrl-C pressed again; `timeout -s TERM` on the
    process group), which lands while the driver deletes its Job: the Job is gone all the same."""
    from kubernetes import client

    # No kubelet: the pods stay Pending, so the driver is still waiting when the signal comes.
    command = driver_command(
        bucket, f"gs://{bucket}/stop-{namespace}", namespace, tmp_path / "sweep", "seed=1,2"
    )
    env = trainer_env(KUBECONFIG=str(kubeconfig), STORAGE_EMULATOR_HOST=emulator.url)
    # Ctrl-C reaches a driver in the foreground. A test run started in the background without
    # job control (`nohup ... &`) ignores SIGINT, and a child would inherit that: give the
    # driver the foreground's default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        driver = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group of its own, as a shell's job has
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        (job,) = wait_for(lambda: jobs(api, namespace), 120, "the driver's Job")
        pod = wait_for(lambda: pods_by_index(api, namespace, job.metadata.name).get(0), 60, "a pod")
        # What a kubelet reports for an image tag that does not exist
        pulling = {
            "name": "trainer",
            "image": IMAGE,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": f"pulling {IMAGE}"}},
        }
        client.CoreV1Api(api).patch_namespaced_pod_status(
            pod[0].metadata.name, namespace, {"status": {"containerStatuses": [pulling]}}
        )
        wait_for(lambda: any("ImagePullBackOff" in line for line in output), 60, "the warning")
        for _ in range(repeats):
            try:
                os.killpg(driver.pid, signum)
            except ProcessLookupError:  # it is done already
                break
            time.sleep(0.015)
        driver.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, "".join(output)[-3000:]
    assert jobs(api, namespace) == []
    assert "run the same command again" in output[-1]
    assert "Traceback" not in "".join(output), "".join(output)[-3000:]


def test_local_paths_and_cluster_problems_are_one_line_and_exit_2(
    api, namespace, kubeconfig, emulator, bucket, tmp_path
):
    def last_line(config: Path, *overrides: str, output=f"gs://{bucket}/errors") -> str:
        command = driver_command(bucket, output, namespace, tmp_path / "sweep", "seed=1,2")
        command.remove(f"hydra.sweep.dir={tmp_path / 'sweep'}")  # Hydra's multirun/DATE/TIME
        result = run_driver([*command, *overrides], config, emulator, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    assert last_line(kubeconfig, output=str(tmp_path / "out")).startswith(
        f"trainer: error: output.dir={tmp_path / 'out'}: a pod sees only gs://"
    )
    assert "no usable kubeconfig" in last_line(tmp_path / "missing")
    refused = kubeconfig_for(api, namespace, "nobody", tmp_path / "nobody", rules=None)
    assert "refused to list Jobs" in last_line(refused)
    unreachable = tmp_path / "unreachable"
    unreachable.write_text(
        kubeconfig.read_text().replace(api.configuration.host, "https://127.0.0.1:9")
    )
    assert "cannot reach the cluster at https://127.0.0.1:9" in last_line(unreachable)
    missing_account = last_line(kubeconfig, "hydra.launcher.service_account=absent")
    assert "hydra.launcher.service_account=absent: no such service account" in missing_account
    # Jobs only: create refused, as for an account given the Role without its create verb
    no_create = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]}]
    no_create.append({"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]})
    viewer = kubeconfig_for(api, namespace, "viewer", tmp_path / "viewer", rules=no_create)
    refused_create = last_line(viewer)
    assert "cannot create Job" in refused_create and "403 Forbidden" in refused_create
    assert jobs(api, namespace) == []
    # Refused before any Job: no sweep directory left behind (Hydra's multirun/DATE/TIME)
    assert "multirun" not in os.listdir(tmp_path)


def test_the_rendered_job_is_accepted_with_strict_field_validation(api, namespace):
    from omegaconf import OmegaConf

    from hydra_plugins.trainer_kubernetes_launcher.kubernetes_launcher import (
        KubernetesLauncherConf,
        job_manifest,
    )

    settings = OmegaConf.to_object(OmegaConf.structured(KubernetesLauncherConf(image=IMAGE)))
    manifest = job_manifest(
        settings, name="strict", namespace=namespace, points=[["seed=1"], ["seed=2"]]
    )

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    def dry_run(body: dict):
        """A raw POST: the typed client would check the body itself, and we want the server to."""
        request = api.param_serialize(
            "POST",
            f"/apis/batch/v1/namespaces/{namespace}/jobs",
            query_params=[("fieldValidation", "Strict"), ("dryRun", "All")],
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request)
        response.read()
        if response.status >= 400:
            raise ApiException(http_resp=response)
        return response

    # As the launcher sends it (the typed client checks types first: quantities are strings)...
    client.BatchV1Api(api).create_namespaced_job(
        namespace, manifest, field_validation="Strict", dry_run="All"
    )
    # ...and as the server sees it.
    accepted = json.loads(dry_run(manifest).data)
    assert accepted["spec"]["completions"] == 2
    rules = accepted["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailIndex", "Ignore"]
    assert rules[0]["onExitCodes"]["values"] == [2, 3, 5, 6]
    manifest["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo
    with pytest.raises(ApiException) as refused:
        dry_run(manifest)
    message = json.loads(refused.value.body)["message"]
    assert 'unknown field "spec.template.spec.containers[0].resource"' in message
