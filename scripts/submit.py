"""Render the trainer's Kubernetes manifests from k8s/ and apply them with kubectl.

    python scripts/submit.py --image IMG [--gpus N] [--workers N] [--name NAME] [--namespace NS]
                             [--dry-run] [-m] -- HYDRA_OVERRIDES...

One run is a batch/v1 Job; `--workers N` an Indexed Job of N workers plus a headless Service
(the trainer builds TF_CONFIG from its index); `-m` expands the override grid with Hydra's own
parser and sweeper, exactly as `python -m trainer -m ...` would, into ONE Indexed Job with one
index per combination, each writing to OUTPUT_DIR/NAME/INDEX. Every combination is composed and
validated against the project's config before anything is submitted: a bad override exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import TrainerError  # noqa: E402

K8S = REPO / "k8s"
PORT = 2222
DEFAULT_IMAGE = os.environ.get("TRAINER_IMAGE", "ghcr.io/example/trainer:0.1.0")


class SubmitError(Exception):
    """A problem with the command line or the overrides; one line, exit code 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="trainer image (env TRAINER_IMAGE)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per pod (0: CPU only)")
    parser.add_argument("--workers", type=int, default=1, help="machines for one run")
    parser.add_argument("--name", help="Job name (default: trainer-<time>)")
    parser.add_argument("--namespace", help="namespace (default: the kubectl context's)")
    parser.add_argument(
        "--accelerator",
        default="nvidia-l4",
        help="GKE accelerator node label value ('' for no node selector)",
    )
    parser.add_argument(
        "--gsa",
        default="trainer@PROJECT.iam.gserviceaccount.com",
        help="Google service account for Workload Identity",
    )
    parser.add_argument("--cpu", default="8", help="CPU request and limit per pod")
    parser.add_argument("--memory", default="32Gi", help="memory request and limit per pod")
    parser.add_argument("--parallelism", type=int, default=4, help="sweep points run at once")
    parser.add_argument("--dry-run", action="store_true", help="print the manifests, apply nothing")
    parser.add_argument("-m", "--multirun", action="store_true", help="expand a sweep grid")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = "trainer-" + time.strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", args.name):
        raise SubmitError(f"--name {args.name}: use lowercase letters, digits and '-' (<= 42)")
    for flag, value, least in (
        ("--gpus", args.gpus, 0),
        ("--workers", args.workers, 1),
        ("--parallelism", args.parallelism, 1),
    ):
        if value < least:
            raise SubmitError(f"{flag} {value}: must be >= {least}")
    if args.multirun and args.workers > 1:
        raise SubmitError("-m with --workers > 1: submit multi-worker runs one at a time")
    return args


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists to run: Hydra's BasicSweeper expansion with -m, else one list."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise SubmitError(f"bad override: {str(error).splitlines()[0]}") from error
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise SubmitError(f"{sweeps[0]}: a sweep needs -m")
        return [list(overrides)]
    return [combo for batch in BasicSweeper.split_arguments(parsed, None) for combo in batch]


def check(combo: list[str]) -> None:
    """Compose and validate `combo` with the project's own config, as the trainer would."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.__main__ import _config_error_line
    from trainer.config import register_configs, validate

    register_configs()
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=combo)
        validate(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise SubmitError(f"config error: {_config_error_line(error)}") from error
    except TrainerError as error:
        raise SubmitError(str(error)) from error
    keys = {o.split("=", 1)[0].lstrip("+~") for o in combo}
    if "output.dir" not in keys:
        raise SubmitError(
            "output.dir is required on the cluster (the pod's disk is scratch): "
            "pass output.dir=gs://BUCKET/PATH"
        )


def _load(template: str, **values) -> dict:
    """A k8s/ template with ${...} fields filled by JSON values (JSON is valid YAML)."""
    text = (K8S / template).read_text()
    return yaml.safe_load(
        string.Template(text).substitute({k: json.dumps(v) for k, v in values.items()})
    )


def render(args: argparse.Namespace, combos: list[list[str]]) -> list[dict]:
    """The manifests for this submission, in apply order."""
    # In Hydra's override syntax: the sweeper escapes ':' (gs\://...); the trainer unescapes it.
    output_dir = next(o.split("=", 1)[1] for o in combos[0] if o.startswith("output.dir="))
    common = ["hydra.run.dir=/scratch/hydra", "hydra.output_subdir=null"]
    job = _load(
        "job.yaml",
        NAME=args.name,
        IMAGE=args.image,
        ARGS=[],
        GPUS=args.gpus,
        ACCELERATOR=args.accelerator,
        CPU=args.cpu,
        MEMORY=args.memory,
        SCRATCH="100Gi",
    )
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if args.gpus == 0 or not args.accelerator:
        del pod["nodeSelector"]
    if args.gpus == 0:
        del pod["tolerations"]
        for kind in ("requests", "limits"):
            del container["resources"][kind]["nvidia.com/gpu"]

    manifests = [_load("serviceaccount.yaml", GSA=args.gsa)]
    if args.multirun:
        points = [combo[:] for combo in combos]
        for index, combo in enumerate(points):
            combo[:] = [o for o in combo if not o.startswith("output.dir=")]
            combo.append(f"output.dir={output_dir.rstrip('/')}/{args.name}/{index}")
        container["args"] = common
        container["env"].append({"name": "TRAINER_SWEEP", "value": json.dumps(points)})
        spec.update(
            completionMode="Indexed",
            completions=len(points),
            parallelism=min(args.parallelism, len(points)),
            backoffLimitPerIndex=2,
        )
        del spec["backoffLimit"]  # per index instead: one bad point does not fail the sweep
        spec["podFailurePolicy"]["rules"][0]["action"] = "FailIndex"
    elif args.workers > 1:
        container["args"] = combos[0] + common
        spec.update(completionMode="Indexed", completions=args.workers, parallelism=args.workers)
        pod["subdomain"] = args.name
        container["ports"] = [{"name": "grpc", "containerPort": PORT}]
        container["env"] += [
            {"name": "TRAINER_WORKERS", "value": str(args.workers)},
            {"name": "TRAINER_SERVICE", "value": args.name},
            {"name": "TRAINER_PORT", "value": str(PORT)},
            {"name": "TRAINER_JOB_NAME", "value": args.name},
        ]
        manifests.append(_load("service.yaml", NAME=args.name))
    else:
        container["args"] = combos[0] + common
    manifests += [_load("networkpolicy.yaml", NAME=args.name), job]
    if args.namespace:
        for manifest in manifests:
            manifest["metadata"]["namespace"] = args.namespace
    return manifests


def follow_up(args: argparse.Namespace) -> list[str]:
    """The commands that follow the run, printed after submitting."""
    ns = f" -n {args.namespace}" if args.namespace else ""
    # From the user's own words: the sweeper's override strings escape ':' as '\:'.
    output_dir = next(o.split("=", 1)[1] for o in args.overrides if o.startswith("output.dir="))
    logdir = f"{output_dir.rstrip('/')}/{args.name}" if args.multirun else output_dir
    pods = f"-l batch.kubernetes.io/job-name={args.name}"
    return [
        f"kubectl{ns} get job {args.name} -w",
        f"kubectl{ns} logs -f {pods} --prefix --max-log-requests 20",
        f"tensorboard --logdir {logdir}        # from a laptop with gcloud credentials",
        f"scripts/tensorboard.sh {logdir}      # or in the cluster, port-forwarded to :6006",
    ]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        combos = expand(args.overrides, args.multirun)
        for combo in combos:
            check(combo)
        documents = yaml.safe_dump_all(render(args, combos), sort_keys=False)
        if args.dry_run:
            print(documents, end="")
            return 0
        if shutil.which("kubectl") is None:
            raise SubmitError("kubectl not found on PATH (use --dry-run to print the manifests)")
        applied = subprocess.run(["kubectl", "apply", "-f", "-"], input=documents, text=True)
        if applied.returncode != 0:
            return applied.returncode
    except SubmitError as error:
        print(f"submit: error: {error}", file=sys.stderr)
        return 2
    points = f"{len(combos)} sweep points" if args.multirun else f"{args.workers} worker(s)"
    print(f"submitted {args.name}: {points}. Follow it with:")
    for line in follow_up(args):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
