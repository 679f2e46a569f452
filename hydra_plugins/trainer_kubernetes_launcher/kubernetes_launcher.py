"""`hydra/launcher=kubernetes`: every batch a Hydra sweeper hands over runs as one Indexed Job.

    python -m trainer -m hydra/launcher=kubernetes hydra.launcher.image=REGISTRY/trainer:TAG \
        'model.dropout=0.1,0.3' data.train_dir=gs://B/train output.dir=gs://B/sweeps/s1

Point N of the sweep (Hydra's job number, continuing across batches) writes to output.dir/N, as a
local multirun does. The Job is `trainer.kube.job(sweep=True)`, the one `scripts/submit.py -m`
applies: index i of a batch runs the i-th point's overrides (TRAINER_SWEEP), a point that exits
2, 3, 5 or 6 fails alone (FailIndex), a preempted pod is replaced. The launcher waits for the Job,
reads each point's metrics.json and hands the sweeper a JobReturn per point: the test accuracy,
or a failure carrying the pod's exit code and last log lines. A re-run with the same output.dir
skips the points whose _SUCCESS exists. Ctrl-C or SIGTERM deletes the Jobs it created (exit 130).
"""

import copy
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict, read_write

from trainer import ExitCode, TrainerError, kube, sweep
from trainer.hydra_run import missing_folders
from trainer.sweep import PointFailed

from .jobs import Cluster, IndexOutcome, LauncherError

log = logging.getLogger(__name__)

_RESOURCES = kube.Resources()


@dataclass
class KubernetesLauncherConf:
    """hydra.launcher.*; pod resources default to scripts/submit.py's (trainer.kube.Resources)."""

    _target_: str = (
        "hydra_plugins.trainer_kubernetes_launcher.kubernetes_launcher.KubernetesLauncher"
    )
    image: str = kube.PLACEHOLDER_IMAGE  # REGISTRY/trainer:TAG, the image `docker build` made
    namespace: str | None = None  # null: the kubeconfig context's
    gpus: int = _RESOURCES.gpus  # per point; 0: CPU only
    accelerator: str = _RESOURCES.accelerator  # GKE node label value; "": any GPU node
    cpu: str = _RESOURCES.cpu
    memory: str = _RESOURCES.memory
    service_account: str = kube.SERVICE_ACCOUNT  # the pods' identity (Workload Identity)
    gsa: str | None = None  # set: create service_account for this Google service account
    parallelism: int = 4  # points of a batch that run at once
    max_hours: float | None = None  # per point: train.max_hours, and the Job's deadline from it
    poll_seconds: float = 30  # how long one watch request lasts before it is re-opened
    name: str | None = None  # Jobs are NAME-<first point>; null: sweep-<time>-<random>


ConfigStore.instance().store(
    group="hydra/launcher", name="kubernetes", node=KubernetesLauncherConf, provider="trainer"
)


@dataclass
class Point:
    """One sweep point: its number, the sweeper's overrides and what its pod runs."""

    num: int
    overrides: list[str]
    config: DictConfig  # composed, `hydra` node included, as a local launcher would run it
    output_dir: str  # output.dir/num
    pod_overrides: list[str]


@dataclass
class Result:
    """A finished point: its metrics, or why it failed."""

    metrics: dict | None = None
    exit_code: int = ExitCode.OK  # the pod's: any int, not only the trainer's own codes
    line: str = ""  # the trainer's one-line error, or what happened to the pod
    log_tail: str = ""
    seconds: float | None = None


class KubernetesLauncher(Launcher):
    """Runs each batch of a sweep as one Indexed Job on the kubeconfig's cluster."""

    def __init__(self, **settings: Any) -> None:
        self.settings = KubernetesLauncherConf(**settings)
        self.name = settings.get("name") or (
            f"sweep-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        )
        self.cluster: Cluster | None = None
        self.created: list[str] = []  # Jobs this driver made; deleted if it is interrupted
        self._recorded: dict[str, float] | None = None  # an earlier run's sweep.csv seconds

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        # The sweeper makes the sweep directory next (multirun.yaml): note what is new, so an
        # attempt refused before any Job leaves no multirun/DATE/TIME behind.
        self.new_folders = missing_folders(os.path.abspath(str(config.hydra.sweep.dir)))
        self.any_job = False

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        """Run the batch as one Job; one JobReturn per point, in the sweeper's order."""
        started = time.monotonic()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        previous = _catch_stop_signals()
        stopping = False
        try:
            points = [
                self._point(initial_job_idx + i, list(overrides))
                for i, overrides in enumerate(job_overrides)
            ]
            results = self._run(points, started=started)
        except (LauncherError, TrainerError) as error:
            self._delete_created()
            if not self.any_job:
                _remove_unused(self.new_folders)
            _exit(error.exit_code, f"trainer: error: {error}")
        except KeyboardInterrupt:
            stopping = True
            _ignore_stop_signals()  # _interrupt did already; a Ctrl-C of Python's own had not
            print("trainer: interrupted: deleting the sweep's Jobs", file=sys.stderr, flush=True)
            self._delete_created()
            _exit(
                ExitCode.INTERRUPTED,
                "trainer: stopped; run the same command again to finish the sweep",
            )
        finally:
            if not stopping:  # stopping: the signals stay ignored until the process is gone
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return [self._job_return(point, results[point.num]) for point in points]

    # -- before the Job ------------------------------------------------------------------------

    def _point(self, num: int, overrides: list[str]) -> Point:
        """Compose the point as a local launcher would and check that a pod can run it."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        HydraConfig.instance().set_config(config)  # resolves ${hydra:...} in the task config
        kube.check_pod_paths(config)
        output_dir = f"{str(config.output.dir).rstrip('/')}/{num}"
        keep = [o for o in overrides if _key(o) not in ("output.dir", "train.max_hours")]
        pod_overrides = keep + [f"output.dir={_escape(output_dir)}"]
        if self.settings.max_hours is not None:
            pod_overrides.append(f"train.max_hours={self.settings.max_hours}")
        return Point(num, overrides, config, output_dir, pod_overrides)

    def _connect(self) -> Cluster:
        if self.cluster is None:
            s = self.settings
            if s.image == kube.PLACEHOLDER_IMAGE:
                raise LauncherError(
                    f"hydra.launcher.image={s.image} is a placeholder: pass "
                    "hydra.launcher.image=REGISTRY/trainer:TAG"
                )
            for key, value, least in (("gpus", s.gpus, 0), ("parallelism", s.parallelism, 1)):
                if value < least:
                    raise LauncherError(f"hydra.launcher.{key}={value}: must be >= {least}")
            if s.max_hours is not None and not s.max_hours > 0:
                raise LauncherError(f"hydra.launcher.max_hours={s.max_hours}: must be > 0")
            cluster = Cluster(s.namespace)
            if s.gsa:
                account = kube.service_account(gsa=s.gsa)
                account["metadata"]["name"] = s.service_account
                cluster.ensure_service_account(account)
            cluster.check_access(s.service_account)
            self.cluster = cluster
        return self.cluster

    # -- the Job ---------------------------------------------------------------------------------

    def _run(self, points: list[Point], *, started: float) -> dict[int, Result]:
        """Results of every point: earlier runs' where _SUCCESS exists, the rest from one Job.
        Logs the launcher's own time (`started`: when the sweeper called) before and after it."""
        results = {p.num: _finished_result(p.output_dir) for p in points}
        todo = [p for p in points if results[p.num] is None]
        for point in points:
            if results[point.num] is not None:
                done = results[point.num]
                done.seconds = self._recorded_seconds(point, done.metrics)
        for point in points:
            mark = "done, skipped" if results[point.num] else "submitting"
            log.info(
                "\t#%d : %s (%s)", point.num, " ".join(filter_overrides(point.overrides)), mark
            )
        if not todo:
            return results
        cluster = self._connect()
        name = f"{self.name}-{todo[0].num}"
        for point in todo:
            HydraConfig.instance().set_config(point.config)
            self.hydra_context.callbacks.on_job_start(
                config=point.config, task_function=self.task_function
            )
        manifest = job_manifest(
            self.settings,
            name=name,
            namespace=cluster.namespace,
            points=[p.pod_overrides for p in todo],
        )
        # Noted before the request: a Ctrl-C while it is on its way may leave the Job made.
        self.created.append(name)
        try:
            cluster.create_job(manifest)
        except LauncherError:
            self.created.remove(name)  # refused: there is no Job to delete
            raise
        self.any_job = True
        submitted = time.monotonic()
        log.info(
            "Job %s (namespace %s): %d point(s), %d at a time, created %.1f s after the batch "
            "came. Follow it with kubectl -n %s get pods -l batch.kubernetes.io/job-name=%s -w",
            name, cluster.namespace, len(todo), min(self.settings.parallelism, len(todo)),
            submitted - started, cluster.namespace, name,
        )  # fmt: skip
        job = cluster.wait(name, poll_seconds=self.settings.poll_seconds, progress=_Progress(name))
        ended = time.monotonic()
        outcomes = cluster.outcomes(job)
        for i, point in enumerate(todo):
            results[point.num] = self._result(point, outcomes[i])
        log.info(
            "Job %s finished after %.1f s; launcher time: %.1f s before the Job, %.1f s after",
            name, ended - submitted, submitted - started, time.monotonic() - ended,
        )  # fmt: skip
        return results

    def _result(self, point: Point, outcome: IndexOutcome) -> Result:
        if outcome.succeeded:
            result = _finished_result(point.output_dir)
            if result is not None:
                result.seconds = outcome.seconds
                return result
            return Result(
                exit_code=ExitCode.CRASH,
                line=f"exit 0 but no _SUCCESS in {point.output_dir}",
                seconds=outcome.seconds,
            )
        if outcome.exit_code is None:
            # e.g. the Job's deadline passed before the point's pod ran: a failure like a crash
            return Result(
                exit_code=ExitCode.CRASH,
                line=f"no pod finished: {outcome.reason or 'unknown'}",
                seconds=outcome.seconds,
            )
        tail = self.cluster.log_tail(outcome.pod, kube.CONTAINER)
        lines = [line for line in tail.splitlines() if line.strip()]
        log.warning(
            "point %d failed: pod %s ended %s, exit %d; its last %d log lines:\n%s",
            point.num, outcome.pod, outcome.reason or "?", outcome.exit_code, len(lines),
            tail.rstrip(),
        )  # fmt: skip
        return Result(
            exit_code=outcome.exit_code,
            line=_failure_line(outcome, lines[-1] if lines else "", self.settings.memory),
            log_tail=tail,
            seconds=outcome.seconds,
        )

    def _recorded_seconds(self, point: Point, metrics: dict) -> float | None:
        """A point finished by an earlier run: the seconds that run's sweep.csv (at output.dir)
        recorded for it, else the sum of its metrics.json timings."""
        if self._recorded is None:
            self._recorded = _summary_seconds(str(point.config.output.dir))
        if point.output_dir in self._recorded:
            return self._recorded[point.output_dir]
        timings = metrics.get("timings") or {}
        steps = [v for v in timings.values() if isinstance(v, int | float)]
        return sum(steps) if steps else None

    def _delete_created(self) -> None:
        """Delete every Job this driver created (their pods go in the background)."""
        for name in self.created:
            try:
                self.cluster.delete_job(name)
                print(f"trainer: deleted Job {name}", file=sys.stderr, flush=True)
            except Exception as error:  # keep deleting the others; say which one is left
                print(f"trainer: could not delete Job {name}: {error}", file=sys.stderr)
        self.created.clear()

    # -- back to the sweeper -----------------------------------------------------------------

    def _job_return(self, point: Point, result: Result) -> JobReturn:
        """The point's JobReturn; Hydra's callbacks (the sweep summary) see it as if it ran here."""
        task_cfg = copy.deepcopy(point.config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(
            overrides=point.overrides,
            cfg=task_cfg,
            hydra_cfg=point.config,
            working_dir=point.output_dir,
            task_name=point.config.hydra.job.name,
        )
        if result.metrics is not None:
            ret.status = JobStatus.COMPLETED
            ret.return_value = result.metrics["test_accuracy"]
        else:
            ret.status = JobStatus.FAILED
            error = PointFailed(result.exit_code, result.line)
            error.log_tail = result.log_tail
            ret.return_value = error
        HydraConfig.instance().set_config(point.config)
        # The summary's record of the point: the pod's metrics and the time its pods ran
        sweep.record_point(result.metrics, result.seconds or 0.0)
        self.hydra_context.callbacks.on_job_end(config=point.config, job_return=ret)
        return ret


def job_manifest(
    settings: KubernetesLauncherConf, *, name: str, namespace: str, points: list[list[str]]
) -> dict:
    """The batch's Job: scripts/submit.py's sweep Job (trainer.kube.job) with these settings."""
    s = settings
    manifest = kube.job(
        name=name,
        image=s.image,
        points=points,
        sweep=True,
        parallelism=s.parallelism,
        max_hours=s.max_hours,
        res=kube.Resources(gpus=s.gpus, accelerator=s.accelerator, cpu=s.cpu, memory=s.memory),
    )
    manifest["metadata"]["namespace"] = namespace
    pod = manifest["spec"]["template"]["spec"]
    pod["serviceAccountName"] = s.service_account
    # The kubernetes client (v37) types every resource quantity as a string ("1", not 1).
    for amounts in pod["containers"][0]["resources"].values():
        amounts.update((kind, str(amount)) for kind, amount in amounts.items())
    return manifest


class _Progress:
    """Logs a Job's counts when they change."""

    def __init__(self, name: str):
        self.name, self.last = name, None

    def __call__(self, job) -> None:
        from .jobs import parse_indexes

        status = job.status
        counts = (
            len(parse_indexes(status.completed_indexes)),
            len(parse_indexes(status.failed_indexes)),
            status.active or 0,
        )
        if counts != self.last:
            self.last = counts
            log.info(
                "%s: %d of %d points succeeded, %d failed, %d pod(s) active",
                self.name, counts[0], job.spec.completions, counts[1], counts[2],
            )  # fmt: skip


def _finished_result(output_dir: str) -> Result | None:
    """The metrics of a point that published (its _SUCCESS exists), else None."""
    import json

    from trainer import gcs, rundir

    bucket, prefix = gcs.split_uri(output_dir, "output.dir")
    with gcs.user_errors(output_dir, "output.dir", gcs.READER_ROLE):
        folder = gcs.client().bucket(bucket)
        if not folder.blob(gcs.join(prefix, rundir.SUCCESS)).exists(retry=gcs.retry()):
            return None
        text = folder.blob(gcs.join(prefix, rundir.METRICS)).download_as_text(retry=gcs.retry())
    return Result(metrics=json.loads(text))


def _remove_unused(folders: list[str]) -> None:
    """Remove `folders` (deepest first) while they hold nothing but Hydra's multirun.yaml."""
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        if set(names) - {"multirun.yaml"}:
            return
        shutil.rmtree(folder, ignore_errors=True)


def _failure_line(outcome: IndexOutcome, last_line: str, memory: str) -> str:
    """A failed point's line: the trainer's own last line when it exited with an error of its
    own; when the container was killed (OOMKilled, a signal: exit > 128), the kubelet's reason
    and the exit code first, as the log cannot say it."""
    code, reason = outcome.exit_code, outcome.reason
    if reason in ("", "Error", "Completed") and code <= 128:
        return last_line or f"pod {outcome.pod} exited {code}"
    how = f"exit {code}"
    if code > 128:
        try:
            how += f", {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    line = f"pod {outcome.pod} ended {reason or 'killed'} ({how})"
    if reason == "OOMKilled":
        line += f": over its memory limit, hydra.launcher.memory={memory}"
    return f"{line}; its last log line: {last_line}" if last_line else line


def _summary_seconds(root: str) -> dict[str, float]:
    """output_dir -> wall_seconds, from an earlier run's sweep.csv at `root` ({} if none)."""
    import csv
    import io

    from trainer import gcs

    if not root.startswith("gs://"):
        return {}
    bucket, prefix = gcs.split_uri(root, "output.dir")
    try:
        with gcs.user_errors(root, "output.dir", gcs.READER_ROLE):
            blob = gcs.client().bucket(bucket).blob(gcs.join(prefix, sweep.SUMMARY))
            if not blob.exists(retry=gcs.retry()):
                return {}
            text = blob.download_as_text(retry=gcs.retry())
    except TrainerError:
        return {}
    seconds = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            seconds[row["output_dir"]] = float(row["wall_seconds"])
        except (KeyError, ValueError):
            pass
    return seconds


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _escape(value: str) -> str:
    """`value` in Hydra's override syntax (the sweepers escape ':' the same way)."""
    from hydra._internal.grammar.utils import escape_special_characters

    return escape_special_characters(value)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _catch_stop_signals() -> dict:
    """While a batch runs, Ctrl-C and SIGTERM raise KeyboardInterrupt (the Jobs are deleted
    first); SIGINT stays ignored where it was (a background job). The handlers it replaced."""
    previous = {}
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _interrupt)
    return previous


def _interrupt(signum, frame) -> None:
    # The first signal stops the batch; later ones (a second Ctrl-C, SIGTERM to the process
    # group after SIGINT) are ignored, so they cannot break the deletion of the Jobs.
    _ignore_stop_signals()
    raise KeyboardInterrupt


def _ignore_stop_signals() -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _exit(code: int, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
