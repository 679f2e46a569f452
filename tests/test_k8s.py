"""Kubernetes: the manifests scripts/submit.py renders, validated as a cluster and a policy
scanner would (kubernetes-validate --strict, checkov), and the sweep it derives from Hydra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, last_error_line, run_trainer

BASE = [
    "data.train_dir=gs://bucket/hotdog/train",
    "data.test_dir=gs://bucket/hotdog/test",
    "output.dir=gs://bucket/runs",
]
VARIANTS = {
    "one_gpu": ["--name", "one"],
    "four_gpus": ["--name", "four", "--gpus", "4"],
    "cpu_only": ["--name", "cpu", "--gpus", "0", "--namespace", "ml"],
    "three_workers": ["--name", "multi", "--workers", "3"],
    "sweep": ["--name", "sweep", "-m"],
}
SWEEP = ["train.learning_rate=1e-3,1e-4", "model.dropout=0.2,0.5", "data.augment=false,true"]


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
        ["kubernetes-validate", "--strict", "--quiet", *files], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_manifest_passes_checkov_with_only_documented_skips(rendered):
    result = subprocess.run(
        ["checkov", "--config-file", str(REPO / ".checkov.yaml"), "-d", str(rendered)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Failed checks: 0" in result.stdout
    config = (REPO / ".checkov.yaml").read_text().splitlines()
    skips = [i for i, line in enumerate(config) if line.strip().startswith("- CKV")]
    for i in skips:  # each skipped check has its reason in the comment just above it
        assert config[i - 1].strip().startswith(("#", "- CKV")), config[i]


def test_one_run_job_fails_fast_on_exit_2_and_3_and_ignores_preemption():
    docs = by_kind(render("four_gpus"))
    job = docs["Job"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert pod["restartPolicy"] == "Never"
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert job["ttlSecondsAfterFinished"] > 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/scratch", "/tmp"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["serviceAccountName"] == "trainer"
    assert "iam.gke.io/gcp-service-account" in docs["ServiceAccount"]["metadata"]["annotations"]
    assert container["args"][: len(BASE)] == BASE
    assert "hydra.run.dir=/scratch/hydra" in container["args"]


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
        assert [o for o in point if not o.startswith("output.dir=")] == [
            o for o in run if not o.startswith("output.dir=")
        ]


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
        "-m", "--", *BASE, "train.learning_rate=1e-3,abc", path=f"{bin_dir}:{os.environ['PATH']}"
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
    result = submit("--name", "demo-run", "--", *BASE, path=f"{bin_dir}:{os.environ['PATH']}")
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
