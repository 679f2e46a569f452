"""Kubernetes: the manifests scripts/submit.py renders (trainer/kube.py), validated as a cluster and
a policy scanner would (kubernetes-validate --strict, checkov), the checks it makes before
anything reaches the cluster, and the sweep it derives from Hydra."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, compose_config, last_error_line, run_trainer
from trainer import kube

BASE = [
    "data.train_dir=gs://bucket/hotdog/train",
    "data.test_dir=gs://bucket/hotdog/test",
    "output.dir=gs://bucket/runs",
]
REAL = ["--image", "registry.example/trainer:1", "--gsa", "sa@proj.iam.gserviceaccount.com"]
VARIANTS = {
    "one_gpu": ["--name", "one"],
    "four_gpus": ["--name", "four", "--gpus", "4", "--accelerator", "nvidia-h100-80gb"],
    "cpu_only": ["--name", "cpu", "--gpus", "0", "--namespace", "ml"],
    "three_workers": [
        "--name",
        "multi",
        "--workers",
        "3",
        "--gsa",
        "ml@proj.iam.gserviceaccount.com",
    ],
    "sweep": ["--name", "sweep", "-m", "--max-hours", "2"],
}
SWEEP = ["train.learning_rate=1e-3,1e-4", "model.dropout=0.2,0.5", "data.augment=false,true"]


def tool(name: str) -> str:
    """A command-line tool installed beside this interpreter (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def submit(*args: str, path: str | None = None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "submit.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )


def render(variant: str) -> list[dict]:
    """The manifests `submit.py --dry-run` prints for one of VARIANTS (a fresh copy each call)."""
    return copy.deepcopy(_rendered_documents(variant))


@functools.cache
def _rendered_documents(variant: str) -> list[dict]:
    extra = SWEEP if variant == "sweep" else []
    result = submit("--dry-run", *VARIANTS[variant], "--", *BASE, *extra)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Every variant submit.py renders, plus the TensorBoard and TFJob manifests, as files."""
    folder = tmp_path_factory.mktemp("manifests")
    for variant in VARIANTS:
        (folder / f"{variant}.yaml").write_text(yaml.safe_dump_all(render(variant)))
    kubectl_log = folder.parent / "kubectl.log"
    bin_dir = fake_kubectl(folder.parent / "bin", kubectl_log)
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "tensorboard.sh"), "gs://bucket/runs", "img:1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    (folder / "tensorboard.yaml").write_text(applied_documents(kubectl_log))
    shutil.copy(REPO / "k8s" / "tfjob.yaml", folder / "tfjob.yaml")
    return folder


def fake_kubectl(bin_dir: Path, log: Path) -> Path:
    """A kubectl stand-in (no cluster here) that records its arguments and what it was fed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kubectl"
    script.write_text(f"""#!/usr/bin/env bash
echo "ARGS $*" >> {log}
if [ "$1" = apply ]; then cat >> {log}; echo "---END" >> {log}; fi
""")
    script.chmod(0o755)
    return bin_dir


def applied_documents(log: Path) -> str:
    text = log.read_text()
    return text.split("ARGS apply -f -\n", 1)[1].split("---END", 1)[0]


def test_every_rendered_manifest_passes_kubernetes_validate_strict(rendered):
    files = sorted(str(p) for p in rendered.glob("*.yaml") if p.name != "tfjob.yaml")
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def undocumented_skips(config: list[str]) -> list[str]:
    """The skipped checks of a .checkov.yaml without their own reason: a comment block right
    above each one (a reason above a previous skip does not count)."""
    return [
        line.strip()
        for above, line in zip(["", *config], config, strict=False)
        if line.strip().startswith("- CKV") and not above.strip().startswith("#")
    ]


def test_every_manifest_passes_checkov_with_only_documented_skips(rendered, tmp_path):
    result = subprocess.run(
        [tool("checkov"), "--config-file", str(REPO / ".checkov.yaml"), "-d", str(rendered)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its parser caches a grammar in TMPDIR
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Failed checks: 0" in result.stdout
    config = (REPO / ".checkov.yaml").read_text().splitlines()
    assert any(line.strip().startswith("- CKV") for line in config)
    assert undocumented_skips(config) == []
    # The check itself: a skip planted right under another skip has no reason of its own.
    planted = ["skip-check:", "  # reason", "  - CKV_K8S_21", "  - CKV_K8S_43"]
    assert undocumented_skips(planted) == ["- CKV_K8S_43"]


def first_action(policy: dict, *, exit_code: int | None = None, condition: str | None = None):
    """What the Job controller does with a failed pod: the first matching rule's action
    (None: no rule matches, the failure counts against the backoff limit)."""
    for rule in policy["rules"]:
        codes = rule.get("onExitCodes", {})
        if exit_code is not None and codes.get("operator") == "In" and exit_code in codes["values"]:
            return rule["action"]
        pod_conditions = [c["type"] for c in rule.get("onPodConditions", [])]
        if condition is not None and condition in pod_conditions:
            return rule["action"]
    return None


def test_one_run_job_fails_fast_on_exit_2_3_5_6_and_ignores_preemption():
    docs = by_kind(render("four_gpus"))
    job = docs["Job"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    policy = job["podFailurePolicy"]
    for code in (2, 3, 5, 6):
        assert first_action(policy, exit_code=code) == "FailJob", code
    for code in (1, 4, 137):  # a crash, an OOM kill; no peers to lose in one pod
        assert first_action(policy, exit_code=code) is None, code
    assert first_action(policy, condition="DisruptionTarget") == "Ignore"
    assert {r["onExitCodes"]["containerName"] for r in policy["rules"] if "onExitCodes" in r} == {
        container["name"]
    }
    assert pod["restartPolicy"] == "Never"
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert job["ttlSecondsAfterFinished"] > 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/scratch", "/tmp"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"] == "trainer"
    assert container["args"][: len(BASE)] == BASE
    # Hydra's run dir (train.log) follows output.dir to a folder on the writable scratch volume.
    assert not any(arg.startswith("hydra.run.dir=") for arg in container["args"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRAINER_CACHE_DIR"].startswith("/scratch/")


def test_gsa_and_accelerator_land_where_gke_reads_them_and_no_namespace_by_default():
    docs = render("three_workers")
    kinds = by_kind(docs)
    annotations = kinds["ServiceAccount"]["metadata"]["annotations"]
    assert annotations == {"iam.gke.io/gcp-service-account": "ml@proj.iam.gserviceaccount.com"}
    pod = kinds["Job"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}  # the default
    assert all("namespace" not in doc["metadata"] for doc in docs)

    result = submit("--dry-run", "--accelerator", "", "--", *BASE)
    assert result.returncode == 0, result.stderr
    pod = by_kind(list(yaml.safe_load_all(result.stdout)))["Job"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and pod["tolerations"]  # any GPU node


def test_cpu_only_run_asks_for_no_gpu_and_lands_in_the_namespace():
    docs = render("cpu_only")
    job = by_kind(docs)["Job"]
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert {doc["metadata"]["namespace"] for doc in docs} == {"ml"}


def test_three_workers_are_one_indexed_job_behind_a_headless_service():
    docs = by_kind(render("three_workers"))
    spec = docs["Job"]["spec"]
    pod = spec["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == docs["Service"]["metadata"]["name"] == "multi"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["TRAINER_WORKERS"] == "3" and env["TRAINER_SERVICE"] == "multi"
    assert env["TRAINER_JOB_NAME"] == "multi" and env["TRAINER_PORT"] == "2222"


def test_a_lost_peer_costs_no_retry_but_a_crash_and_permanent_errors_still_count():
    job = by_kind(render("three_workers"))["Job"]["spec"]
    policy = job["podFailurePolicy"]
    assert first_action(policy, exit_code=4) == "Ignore"  # survivors of a preempted worker
    assert first_action(policy, condition="DisruptionTarget") == "Ignore"
    for code in (2, 3, 5, 6):
        assert first_action(policy, exit_code=code) == "FailJob", code
    assert first_action(policy, exit_code=1) is None and job["backoffLimit"] >= 1
    assert job["activeDeadlineSeconds"] > 0  # what still bounds endless lost peers
    container = job["template"]["spec"]["containers"][0]["name"]
    assert {r["onExitCodes"]["containerName"] for r in policy["rules"] if "onExitCodes" in r} == {
        container
    }


def test_multirun_with_workers_is_refused():
    result = submit("--dry-run", "-m", "--workers", "2", "--", *BASE, "model.dropout=0.1,0.2")
    assert result.returncode == 2
    assert last_error_line(result) == (
        "submit: error: -m with --workers > 1: submit multi-worker runs one at a time"
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.test_dir=data/hotdog/test", "data.test_dir"),
        ("data.train_dir=/home/me/train", "data.train_dir"),
        ("output.dir=runs/first", "output.dir"),
        ("model.weights=/tmp/resnet50_notop.h5", "model.weights"),
    ],
)
def test_a_path_no_pod_can_reach_is_refused_naming_its_key(tmp_path, override, key):
    log = tmp_path / "kubectl.log"
    bin_dir = fake_kubectl(tmp_path / "bin", log)
    overrides = [o for o in BASE if not o.startswith(key + "=")] + [override]
    result = submit(*REAL, "--", *overrides, path=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 2, result.stderr
    assert last_error_line(result).startswith(f"submit: error: {override}: ")
    assert "gs://" in last_error_line(result)
    assert not log.exists()


def test_paths_the_image_holds_and_a_preset_with_gs_paths_are_accepted():
    for weights in ("model.weights=imagenet", "model.weights=null", "model.weights=gs://b/w.h5"):
        result = submit("--dry-run", "--", *BASE, weights, "data.test_dir=null")
        assert result.returncode == 0, (weights, result.stderr)


def test_a_preset_local_test_dir_is_refused_when_only_train_dir_is_overridden():
    """The issue's case: experiment=hotdog keeps its local data/hotdog/test."""
    result = submit(
        "--dry-run", "--", "experiment=hotdog", "data.train_dir=gs://b/t", "output.dir=gs://b/r"
    )
    assert result.returncode == 2
    assert last_error_line(result).startswith("submit: error: data.test_dir=data/hotdog/test: ")


@pytest.mark.parametrize(
    "flags, env, named",
    [
        (["--gsa", "sa@proj.iam.gserviceaccount.com"], {}, "--image"),
        (["--image", "registry.example/trainer:1"], {}, "--gsa"),
        ([], {"TRAINER_IMAGE": "registry.example/trainer:1"}, "--gsa"),
    ],
)
def test_a_real_submit_of_a_placeholder_is_refused_naming_the_flag(tmp_path, flags, env, named):
    log = tmp_path / "kubectl.log"
    bin_dir = fake_kubectl(tmp_path / "bin", log)
    environ = {k: v for k, v in os.environ.items() if k != "TRAINER_IMAGE"}
    environ |= env | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "submit.py"), *flags, "--", *BASE],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert last_error_line(result).startswith(f"submit: error: {named}: ")
    assert "placeholder" in last_error_line(result)
    assert not log.exists()


def test_help_shows_every_default():
    result = submit("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    defaults = {
        "--gpus": "1",
        "--accelerator": "nvidia-l4",
        "--cpu": "8",
        "--memory": "32Gi",
        "--parallelism": "4",
        "--gsa": "trainer@PROJECT.iam.gserviceaccount.com",
    }
    for flag, value in defaults.items():
        described = re.search(rf"{flag} [A-Z_]+ (.*?)(?= -[-a-z]|$)", text)  # not the usage line
        assert described and re.search(rf"\(default: {re.escape(value)}[,)]", described[1]), flag


def test_sweep_points_get_the_time_limit_and_the_deadline_covers_every_wave():
    job = by_kind(render("sweep"))["Job"]["spec"]
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    points = json.loads(env["TRAINER_SWEEP"])
    assert all("train.max_hours=2.0" in point for point in points)
    # 8 points, 4 at a time (the default parallelism): 2 waves of at most 2 h each
    assert job["parallelism"] == 4
    assert 2 * 2 * 3600 < job["activeDeadlineSeconds"] <= 2 * 2 * 3600 + 3600
    policy = job["podFailurePolicy"]
    for code in (2, 3, 5, 6):  # one bad or slow point fails alone
        assert first_action(policy, exit_code=code) == "FailIndex", code
    assert first_action(policy, condition="DisruptionTarget") == "Ignore"


def test_the_deadline_follows_points_parallelism_and_limit():
    result = submit(
        "--dry-run", "-m", "--parallelism", "3", "--max-hours", "0.5", "--", *BASE, *SWEEP
    )
    assert result.returncode == 0, result.stderr
    deadline = by_kind(list(yaml.safe_load_all(result.stdout)))["Job"]["spec"][
        "activeDeadlineSeconds"
    ]
    # 8 points, 3 at a time: 3 waves, the last a partial one, each with the whole limit and
    # the margin a point needs around it
    wave = 1800 + kube.POINT_MARGIN_S
    waves = math.ceil(8 / 3)
    assert waves * wave <= deadline <= waves * wave + 3600
    one = by_kind(render("one_gpu"))["Job"]["spec"]["activeDeadlineSeconds"]
    assert one == 24 * 3600  # no limit: one day, as before


def test_a_partial_last_wave_of_a_sweep_gets_a_whole_wave_of_deadline():
    """7 points 3 at a time run in 3 waves, as 9 do: the 7th point, alone in the last wave,
    still gets its whole train.max_hours before the Job's deadline."""
    deadline = functools.partial(kube.deadline_seconds, parallelism=3, max_hours=0.5)
    assert deadline(points=7) == deadline(points=9)
    assert deadline(points=7) - deadline(points=6) >= 1800


def test_train_max_hours_as_an_override_is_refused_in_favour_of_the_flag():
    result = submit("--dry-run", "--", *BASE, "train.max_hours=3")
    assert result.returncode == 2
    assert "--max-hours" in last_error_line(result)


def test_tfjob_example_is_generated_from_the_same_pod_as_the_job():
    assert (REPO / "k8s" / "tfjob.yaml").read_text() == kube.tfjob_example_text()
    tfjob = yaml.safe_load(kube.tfjob_example_text())
    pod = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    job_pod = by_kind(render("one_gpu"))["Job"]["spec"]["template"]["spec"]
    container, job_container = pod["containers"][0], job_pod["containers"][0]
    assert container["name"] == "tensorflow"  # the operator's expected container name
    for key in ("resources", "securityContext", "volumeMounts"):
        assert container[key] == job_container[key], key
    assert pod["securityContext"] == job_pod["securityContext"]
    assert pod["volumes"] == job_pod["volumes"]


def test_tensorboard_pod_has_the_trainer_security_context(rendered):
    docs = by_kind(list(yaml.safe_load_all((rendered / "tensorboard.yaml").read_text())))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    job_pod = by_kind(render("one_gpu"))["Job"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"] == job_pod["containers"][0]["securityContext"]
    assert pod["securityContext"].items() <= job_pod["securityContext"].items()


RECORDER = """
import json, sys
import hydra
from hydra.core.hydra_config import HydraConfig
from trainer.config import register_configs

register_configs()

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
def record(cfg):
    with open({out!r}, "a") as f:
        f.write(json.dumps(list(HydraConfig.get().overrides.task)) + "\\n")

record()
"""


def test_sweep_renders_exactly_the_combinations_hydra_multirun_runs(tmp_path):
    """Hydra's own multirun (BasicSweeper + BasicLauncher) against the rendered Indexed Job."""
    out = tmp_path / "combos.jsonl"
    script = tmp_path / "record.py"
    script.write_text(RECORDER.format(conf=str(REPO / "conf"), out=str(out)))
    result = subprocess.run(
        [sys.executable, str(script), "-m", *BASE, *SWEEP, f"hydra.sweep.dir={tmp_path}/sweep"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    hydra_runs = [json.loads(line) for line in out.read_text().splitlines()]

    job = by_kind(render("sweep"))["Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    points = json.loads(env["TRAINER_SWEEP"])

    assert len(points) == len(hydra_runs) == 8
    assert job["spec"]["completions"] == 8 and job["spec"]["backoffLimitPerIndex"] >= 1
    assert job["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"
    for index, (point, run) in enumerate(zip(points, hydra_runs, strict=True)):
        assert f"output.dir=gs\\://bucket/runs/sweep/{index}" in point  # Hydra's escaping
        assert point[-2] == "train.max_hours=2.0"  # --max-hours, on every point
        assert point[0] == "storage.feature_cache=gs\\://bucket/runs/sweep/features"
        assert [o for o in point[1:-2] if not o.startswith("output.dir=")] == [
            o for o in run if not o.startswith("output.dir=")
        ]


def test_sweep_points_share_one_feature_cache_beside_the_sweep_output():
    """The points compute the backbone's features once between them; the pod's config
    resolves the override (Hydra's escaped ':') to gs://.../NAME/features."""
    job = by_kind(render("sweep"))["Job"]["spec"]
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    points = json.loads(env["TRAINER_SWEEP"])
    cache = "storage.feature_cache=gs\\://bucket/runs/sweep/features"
    assert all(point.count(cache) == 1 for point in points)
    assert len(points) == 8
    cfg = compose_config(*points[3])
    assert cfg.storage.feature_cache == "gs://bucket/runs/sweep/features"
    assert cfg.output.dir == "gs://bucket/runs/sweep/3"


def test_a_sweep_keeps_the_users_own_feature_cache():
    result = submit(
        "--dry-run",
        "-m",
        "--name",
        "mine",
        "--",
        *BASE,
        "model.dropout=0.2,0.5",
        "storage.feature_cache=gs://other/features",
    )
    assert result.returncode == 0, result.stderr
    job = by_kind(list(yaml.safe_load_all(result.stdout)))["Job"]["spec"]
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    for point in json.loads(env["TRAINER_SWEEP"]):
        caches = [o for o in point if o.startswith("storage.feature_cache=")]
        assert caches == ["storage.feature_cache=gs\\://other/features"]


def test_trainer_pod_runs_the_sweep_point_of_its_index(tmp_path):
    points = [["data.train_dir=x"], ["data.train_dir=x", "data.imagesize=9"]]
    env = {**os.environ, "TRAINER_SWEEP": json.dumps(points), "JOB_COMPLETION_INDEX": "1"}
    result = run_trainer(cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "data.imagesize" in last_error_line(result)


def test_bad_override_is_refused_before_anything_is_submitted(tmp_path):
    log = tmp_path / "kubectl.log"
    bin_dir = fake_kubectl(tmp_path / "bin", log)
    result = submit(
        *REAL,
        "-m",
        "--",
        *BASE,
        "train.learning_rate=1e-3,abc",
        path=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "submit: error: config error: train.learning_rate: "
        "Value 'abc' of type 'str' could not be converted to Float"
    ]
    assert not log.exists()


def test_missing_output_dir_is_refused(tmp_path):
    result = submit("--dry-run", "--", "data.train_dir=gs://b/train")
    assert result.returncode == 2
    assert "output.dir is required" in last_error_line(result)


def test_submit_applies_with_kubectl_and_prints_how_to_follow_the_run(tmp_path):
    log = tmp_path / "kubectl.log"
    bin_dir = fake_kubectl(tmp_path / "bin", log)
    result = submit(
        *REAL, "--name", "demo-run", "--", *BASE, path=f"{bin_dir}:{os.environ['PATH']}"
    )
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(applied_documents(log))]
    assert kinds == ["ServiceAccount", "NetworkPolicy", "Job"]
    assert "kubectl logs -f -l batch.kubernetes.io/job-name=demo-run" in result.stdout
    assert "tensorboard --logdir gs://bucket/runs" in result.stdout


def test_tensorboard_script_applies_the_deployment_and_port_forwards(rendered):
    docs = by_kind(list(yaml.safe_load_all((rendered / "tensorboard.yaml").read_text())))
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--logdir", "gs://bucket/runs"]
    assert docs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"
    log = (rendered.parent / "kubectl.log").read_text()
    assert "ARGS port-forward service/trainer-tensorboard 6006:6006" in log


def test_the_manifest_module_loads_without_tensorflow():
    """scripts/submit.py and a launcher on a laptop render Jobs without TensorFlow installed."""
    code = (
        "import sys, trainer.kube; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_the_manifest_module_says_what_it_prints_on_help():
    result = subprocess.run(
        [sys.executable, "-m", "trainer.kube", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m trainer.kube")
    assert "TFJob" in result.stdout and "apiVersion" not in result.stdout


def test_the_tensorboard_script_refuses_the_placeholder_image_as_submit_does(tmp_path):
    log = tmp_path / "kubectl.log"
    bin_dir = fake_kubectl(tmp_path / "bin", log)
    environ = {k: v for k, v in os.environ.items() if k != "TRAINER_IMAGE"}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "tensorboard.sh"), "gs://bucket/runs"],
        capture_output=True,
        text=True,
        env=environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == last_error_line(result)  # one line
    assert kube.PLACEHOLDER_IMAGE in result.stderr and "placeholder" in result.stderr
    assert not log.exists()  # nothing applied


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl on PATH")
def test_a_submit_to_a_cluster_kubectl_cannot_reach_is_one_line_naming_the_context(tmp_path):
    """Real kubectl, pointed at a port nothing listens on: not its --validate=false hint."""
    from tests.conftest import free_ports

    (port,) = free_ports(1)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "contexts": [{"name": "gone-ctx", "context": {"cluster": "gone", "user": "u"}}],
                "current-context": "gone-ctx",
                "users": [{"name": "u", "user": {"token": "x"}}],
            }
        )
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "submit.py"), *REAL, "--", *BASE],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == last_error_line(result)  # one line
    line = last_error_line(result)
    assert line.startswith("submit: error: kubectl cannot reach the cluster (context gone-ctx")
    assert f"127.0.0.1:{port}" in line and "--validate=false" not in line
