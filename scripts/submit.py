"""Render the trainer's Kubernetes manifests (trainer/kube.py) and apply them with kubectl.

    python scripts/submit.py --image IMG --gsa GSA [--gpus N] [--workers N] [--name NAME]
                             [--namespace NS] [--max-hours H] [--dry-run] [-m] -- OVERRIDES...

One run is a batch/v1 Job; `--workers N` an Indexed Job of N workers plus a headless Service
(the trainer builds TF_CONFIG from its index); `-m` expands the override grid with Hydra's own
parser and sweeper, exactly as `python -m trainer -m ...` would, into ONE Indexed Job with one
index per combination, each writing to OUTPUT_DIR/NAME/INDEX. Every combination is composed and
validated against the project's config before anything is submitted, and every path a pod reads
or writes must be gs:// (or the image's baked ImageNet weights): a bad override exits 2.
`--max-hours H` stops each point after H hours (exit 5) and sizes the Job's deadline from it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import ExitCode, TrainerError, config_error_line, kube  # noqa: E402

DEFAULT_IMAGE = os.environ.get("TRAINER_IMAGE", kube.PLACEHOLDER_IMAGE)


class SubmitError(Exception):
    """A problem with the command line or the overrides; one line."""

    exit_code = ExitCode.USER_ERROR


def parse_args(argv: list[str]) -> argparse.Namespace:
    res = kube.Resources()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--image",
        default=DEFAULT_IMAGE,
        help="trainer image (env TRAINER_IMAGE; default: %(default)s, a placeholder for --dry-run)",
    )
    add(
        "--gpus",
        type=int,
        default=res.gpus,
        help="GPUs per pod, 0: CPU only (default: %(default)s)",
    )
    add("--workers", type=int, default=1, help="machines for one run (default: %(default)s)")
    add("--name", help="Job name (default: trainer-<time>)")
    add("--namespace", help="namespace (default: the kubectl context's)")
    add(
        "--accelerator",
        default=res.accelerator,
        help="GKE accelerator node label value, '' for no node selector (default: %(default)s)",
    )
    add(
        "--gsa",
        default=kube.PLACEHOLDER_GSA,
        help="Google service account for Workload Identity "
        "(default: %(default)s, a placeholder for --dry-run)",
    )
    add("--cpu", default=res.cpu, help="CPU request and limit per pod (default: %(default)s)")
    add(
        "--memory",
        default=res.memory,
        help="memory request and limit per pod (default: %(default)s)",
    )
    add(
        "--parallelism", type=int, default=4, help="sweep points run at once (default: %(default)s)"
    )
    add(
        "--max-hours",
        type=float,
        help="stop each point after this many hours (exit 5) and size the Job's deadline from it "
        f"(default: none; the Job's deadline is {kube.DEFAULT_DEADLINE_S // 3600} h)",
    )
    add("--dry-run", action="store_true", help="print the manifests, apply nothing")
    add("-m", "--multirun", action="store_true", help="expand a sweep grid")
    add("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = "trainer-" + time.strftime("%Y%m%d-%H%M%S")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """The flags alone, before any override is composed."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", args.name):
        raise SubmitError(f"--name {args.name}: use lowercase letters, digits and '-' (<= 42)")
    for flag, value, least in (
        ("--gpus", args.gpus, 0),
        ("--workers", args.workers, 1),
        ("--parallelism", args.parallelism, 1),
    ):
        if value < least:
            raise SubmitError(f"{flag} {value}: must be >= {least}")
    if args.max_hours is not None and not args.max_hours > 0:
        raise SubmitError(f"--max-hours {args.max_hours}: must be > 0")
    if args.multirun and args.workers > 1:
        raise SubmitError("-m with --workers > 1: submit multi-worker runs one at a time")
    if any(o.lstrip("+~").startswith("train.max_hours=") for o in args.overrides):
        raise SubmitError("train.max_hours: pass --max-hours instead (it also sizes the deadline)")
    if args.dry_run:  # placeholders are fine for reading the manifests
        return
    try:
        kube.check_image(args.image, flag="--image")
    except TrainerError as error:
        raise SubmitError(str(error)) from error
    if args.gsa == kube.PLACEHOLDER_GSA:
        raise SubmitError(
            f"--gsa: {args.gsa} is a placeholder: pass --gsa NAME@PROJECT.iam.gserviceaccount.com, "
            "the Google service account with access to your bucket"
        )


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
    """Compose and validate `combo` with the project's own config, as the trainer would, and
    check that a pod can reach every path it names."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import register_configs, validate

    keys = {o.split("=", 1)[0].lstrip("+~") for o in combo}
    if "output.dir" not in keys:
        raise SubmitError(
            "output.dir is required on the cluster (the pod's disk is scratch): "
            "pass output.dir=gs://BUCKET/PATH"
        )
    register_configs()
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=combo)
        validate(cfg)
        kube.check_pod_paths(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise SubmitError(f"config error: {config_error_line(error)}") from error
    except TrainerError as error:
        raise SubmitError(str(error)) from error


def points(args: argparse.Namespace, combos: list[list[str]]) -> list[list[str]]:
    """Each run's overrides as the pod receives them: a sweep point writes to OUTPUT_DIR/NAME/i
    and shares the feature cache OUTPUT_DIR/NAME/features (unless the user set
    storage.feature_cache), and --max-hours becomes train.max_hours (added after check(): the
    flag is already checked)."""
    limit = [f"train.max_hours={args.max_hours}"] if args.max_hours is not None else []
    if not args.multirun:
        return [combos[0] + limit]
    # In Hydra's override syntax: the sweeper escapes ':' (gs\\://...); the trainer unescapes it.
    output_dir = next(o.split("=", 1)[1] for o in combos[0] if o.startswith("output.dir="))
    root = f"{output_dir.rstrip('/')}/{args.name}"
    return [
        kube.shared_feature_cache(
            [o for o in combo if not o.startswith("output.dir=")]
            + limit
            + [f"output.dir={root}/{index}"],
            sweep_root=root,
        )
        for index, combo in enumerate(combos)
    ]


def render(args: argparse.Namespace, combos: list[list[str]]) -> list[dict]:
    """The manifests for this submission, in apply order."""
    return kube.manifests(
        name=args.name,
        gsa=args.gsa,
        namespace=args.namespace,
        image=args.image,
        points=points(args, combos),
        sweep=args.multirun,
        workers=args.workers,
        parallelism=args.parallelism,
        max_hours=args.max_hours,
        res=kube.Resources(
            gpus=args.gpus, accelerator=args.accelerator, cpu=args.cpu, memory=args.memory
        ),
    )


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
        f"python -m trainer.tensorboard --logdir {logdir}   # from a laptop with gcloud login",
        f"scripts/tensorboard.sh {logdir}      # or in the cluster, port-forwarded to :6006",
    ]


# How kubectl says it never reached the API server (its own hint, --validate=false, cannot help).
_UNREACHABLE = re.compile(
    r"Unable to connect to the server: [^;\n]*|dial tcp [^;\"\n]*"
    r"|[^;:\"\n]*(?:no such host|i/o timeout|TLS handshake timeout|connection refused)"
)


def apply(documents: str) -> int:
    """`kubectl apply -f -` of `documents`: kubectl's exit code, its errors passed on; a
    cluster kubectl cannot reach is a SubmitError (exit 2) naming the context and server."""
    applied = subprocess.run(
        ["kubectl", "apply", "-f", "-"], input=documents, text=True, stderr=subprocess.PIPE
    )
    unreachable = _UNREACHABLE.search(applied.stderr) if applied.returncode else None
    if unreachable:
        raise SubmitError(
            f"kubectl cannot reach the cluster ({current_context()}): {unreachable.group(0)};"
            " nothing was submitted; check `kubectl config current-context` (GKE: gcloud"
            " container clusters get-credentials CLUSTER) and that the cluster is up"
        )
    sys.stderr.write(applied.stderr)
    return applied.returncode


def current_context() -> str:
    """kubectl's current context and its server, as a phrase."""
    view = subprocess.run(
        [
            "kubectl",
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.current-context} {.clusters[0].cluster.server}",
        ],
        capture_output=True,
        text=True,
    )
    context, _, server = view.stdout.strip().partition(" ")
    if view.returncode or not context:
        return "no current kubectl context"
    return f"context {context}, server {server}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        combos = expand(args.overrides, args.multirun)
        for combo in combos:
            check(combo)
        documents = yaml.safe_dump_all(render(args, combos), sort_keys=False)
        if args.dry_run:
            print(documents, end="")
            return ExitCode.OK
        if shutil.which("kubectl") is None:
            raise SubmitError("kubectl not found on PATH (use --dry-run to print the manifests)")
        code = apply(documents)
        if code != 0:
            return code
    except SubmitError as error:
        print(f"submit: error: {error}", file=sys.stderr)
        return error.exit_code
    points = f"{len(combos)} sweep points" if args.multirun else f"{args.workers} worker(s)"
    print(f"submitted {args.name}: {points}. Follow it with:")
    for line in follow_up(args):
        print("  " + line)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
