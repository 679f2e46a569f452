"""Local sweeps (`python -m trainer -m ...`) that survive a failing point, and their summary.

In a multirun each point's error reaches Hydra as an exception (`PointFailed`, carrying the exit
code a single run would have), so the sweeper goes on with the next point and Optuna's
`max_failure_rate` applies. `SweepSummary`, a Hydra Callback registered in conf/config.yaml,
records each point and writes `sweep.csv` and a TensorBoard HParams experiment at the end.

Why a Callback: `on_job_end` receives every point's JobReturn (overrides, status, the exception)
in the process that ran it, whatever the launcher, and `on_multirun_start`/`on_multirun_end` run
in the sweep's own process. Hydra's BasicSweeper re-raises the first failure after its batch and
then skips `on_multirun_end`, so `__main__` also calls `finish` on that path (it runs once).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import time

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer import ExitCode, TrainerError

log = logging.getLogger(__name__)

SUMMARY = "sweep.csv"
POINTS = ".sweep_points"  # one JSON record per finished point until `finish` sums them up
COLUMNS = [
    "point",
    "overrides",
    "status",
    "exit_code",
    "test_accuracy",
    "test_loss",
    "wall_seconds",
    "output_dir",
]
_DEFAULT_OUTPUT = "${hydra:runtime.output_dir}"

# The sweep's own process: where records are and what `finish` returned (set per multirun).
_sweep: dict = {}
# What on_job_end records for the point that just ended: its metrics and seconds, set through
# `record_point` by whoever ran it (`run_point` here; the Kubernetes launcher for a pod's point).
_point: dict = {}


class PointFailed(Exception):
    """A sweep point ended with `code` (an ExitCode, or a pod's from the Kubernetes launcher);
    `line` is what a single run prints."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code = code


class SweepStopped(BaseException):
    """SIGTERM (the pod or machine is going away) or Ctrl-C during a sweep: no further point
    starts.
    A BaseException, so Hydra's job runner and callback guards let it through."""


def in_multirun() -> bool:
    """True inside a point of `python -m trainer -m ...`."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _explicit_output_root(cfg: DictConfig) -> str | None:
    """output.dir as the user gave it, or None when it is Hydra's per-point directory."""
    raw = OmegaConf.to_container(cfg.output, resolve=False)["dir"]
    return None if raw == _DEFAULT_OUTPUT else str(cfg.output.dir).rstrip("/")


def started() -> bool:
    """True in the process that runs a multirun (after its on_multirun_start)."""
    return bool(_sweep)


def point_config(cfg: DictConfig) -> DictConfig:
    """In a multirun, an explicit output.dir is the sweep's root: point N writes to
    output.dir/N (local or gs://), the layout scripts/submit.py -m uses on the cluster."""
    if not in_multirun():
        return cfg
    root = _explicit_output_root(cfg)
    if root is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.output.dir = f"{root}/{HydraConfig.get().job.num}"
    return cfg


def run_point(run, cfg: DictConfig) -> dict:
    """`run(cfg)` for a single run or a sweep point, recording its metrics and seconds for the
    summary (a failed point's seconds too)."""
    started = time.perf_counter()
    record_point(None, 0.0)
    try:
        metrics = run(point_config(cfg))
    except BaseException:
        record_point(None, time.perf_counter() - started)
        raise
    record_point(metrics, time.perf_counter() - started)
    return metrics


def record_point(metrics: dict | None, seconds: float) -> None:
    """What the summary records for the point whose on_job_end comes next: its metrics (None
    when it failed) and how long it ran. Called by `run_point` for a point run in this process,
    and by a launcher that ran the point elsewhere (hydra/launcher=kubernetes: the pods' time)."""
    _point.clear()
    _point.update(metrics=metrics, seconds=seconds)


def raise_or_exit(code: int, line: str, error: BaseException, exit) -> None:
    """A single run prints `line` and exits `code` (via `exit`); a sweep point raises it to
    Hydra so the sweep goes on."""
    if in_multirun():
        raise PointFailed(code, line) from error
    exit(code, line)


class SweepSummary(Callback):
    """Records each point of a multirun; writes sweep.csv and the HParams experiment at the end.
    Does nothing in a single run."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        _sweep.clear()
        _sweep.update(dir=sweep_dir, output_root=_explicit_output_root(config), done=False)
        shutil.rmtree(os.path.join(sweep_dir, POINTS), ignore_errors=True)  # an earlier sweep's

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        num = int(config.hydra.job.num)
        record = {
            "point": num,
            "overrides": " ".join(_swept(job_return.overrides)),
            "status": "ok",
            "exit_code": ExitCode.OK,
            "test_accuracy": None,
            "test_loss": None,
            "wall_seconds": round(_point.get("seconds") or 0.0, 1),
            "output_dir": _point_output_dir(job_return.cfg, num),
        }
        if job_return.status == JobStatus.FAILED:
            # Its line is printed below: the sweeper's read of it must not add Hydra's own
            job_return.__class__ = _Reported
        try:
            _ = job_return.return_value  # re-raises the point's exception
            metrics = _point.get("metrics") or {}
            record.update(
                test_accuracy=metrics.get("test_accuracy"), test_loss=metrics.get("test_loss")
            )
        except PointFailed as error:
            record.update(status="failed", exit_code=error.code)
            _report(num, record["overrides"], error.code, str(error))
        except Exception as error:  # a crash: the point's log gets the traceback
            log.error("sweep point %d crashed", num, exc_info=error)
            first = (str(error).strip().splitlines() or [""])[0]
            record.update(status="crashed", exit_code=ExitCode.CRASH)
            _report(
                num,
                record["overrides"],
                ExitCode.CRASH,
                f"trainer: crash: {type(error).__name__}: {first}",
            )
        _point.clear()
        points = os.path.join(str(config.hydra.sweep.dir), POINTS)
        os.makedirs(points, exist_ok=True)
        with open(os.path.join(points, f"{num}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
        if record["exit_code"] in (ExitCode.PREEMPTED, ExitCode.INTERRUPTED):
            raise SweepStopped(f"stopped during sweep point {num}: no further point starts")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        finish()


class _Reported(JobReturn):
    """A failed point's JobReturn once its one line is printed. Hydra's JobReturn writes "Error
    executing job with overrides: [...]" to stderr each time its return_value is read (by this
    summary, then by the sweeper); this one only raises the point's error."""

    @property
    def return_value(self):
        if self.status == JobStatus.COMPLETED:
            return self._return_value
        raise self._return_value

    @return_value.setter
    def return_value(self, value) -> None:
        self._return_value = value


def _swept(overrides: list[str]) -> list[str]:
    """The point's own overrides: those not given literally on the command line (the sweep's
    values; Optuna's suggestions). All of them are in the point's .hydra/overrides.yaml. The
    sweepers hand a constant value over escaped (`gs\\://b`), so both sides are compared
    unescaped."""
    given = {_unescaped(a) for a in sys.argv[1:]}
    own = [o for o in overrides if _unescaped(o) not in given]
    return own or list(overrides)


def _unescaped(override: str) -> str:
    """An override without the backslashes of Hydra's escaping (`\\:` -> `:`)."""
    return re.sub(r"\\(.)", r"\1", override)


def _point_output_dir(cfg: DictConfig, num: int) -> str:
    root = _explicit_output_root(cfg)
    return f"{root}/{num}" if root is not None else str(cfg.output.dir)


def _report(num: int, overrides: str, code: int, line: str) -> None:
    """One line on stderr per failed point, naming it by number and overrides."""
    print(f"sweep point {num} [{overrides}] exit {code}: {line}", file=sys.stderr, flush=True)


def finish() -> int:
    """At the end of a multirun (once): sweep.csv and the HParams experiment in the sweep
    directory and output.dir's root, the table on stdout, best first. Returns the process's
    exit code: the first failing point's, 0 if every point succeeded, 0 outside a multirun."""
    if not _sweep:
        return ExitCode.OK
    if _sweep["done"]:
        return _sweep["code"]
    records = _load_records(_sweep["dir"])
    text = summary_csv(records)
    roots = [_sweep["dir"]] + ([_sweep["output_root"]] if _sweep["output_root"] else [])
    hparams_file = write_hparams_experiment(_sweep["dir"], records)
    for root in roots:
        try:
            _write(root, SUMMARY, text.encode())
            if root != _sweep["dir"] and hparams_file:
                with open(hparams_file, "rb") as f:
                    _write(root, os.path.basename(hparams_file), f.read())
        except TrainerError as error:  # no credentials, no access: the local copy still stands
            print(f"sweep: summary not written to {root}: {error}", file=sys.stderr, flush=True)
    print(format_table(records), flush=True)
    failed = [r for r in records if r["exit_code"] != ExitCode.OK]
    code = failed[0]["exit_code"] if failed else ExitCode.OK
    print(
        f"sweep: {len(records) - len(failed)} of {len(records)} points succeeded; "
        f"summary in {_sweep['dir']}/{SUMMARY}",
        flush=True,
    )
    # sweep.csv now holds every record; the sweep directory keeps one folder per point.
    shutil.rmtree(os.path.join(_sweep["dir"], POINTS), ignore_errors=True)
    _sweep.update(done=True, code=code)
    return code


def _load_records(sweep_dir: str) -> list[dict]:
    folder = os.path.join(sweep_dir, POINTS)
    if not os.path.isdir(folder):
        return []
    records = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            records.append(json.load(f))
    return sorted(records, key=lambda r: r["point"])


def _best_first(records: list[dict]) -> list[dict]:
    """Succeeded points by test accuracy (then loss), then failed ones by point number."""

    def key(r):
        accuracy = r["test_accuracy"]
        loss = r["test_loss"] if r["test_loss"] is not None else float("inf")
        return (
            r["exit_code"] != ExitCode.OK,
            -(accuracy if accuracy is not None else -1),
            loss,
            r["point"],
        )

    return sorted(records, key=key)


def summary_csv(records: list[dict]) -> str:
    """sweep.csv's text: one row a point, best first."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in _best_first(records):
        writer.writerow({k: "" if record[k] is None else record[k] for k in COLUMNS})
    return out.getvalue()


def _four_places(value: float | None) -> str:
    """`value` to four decimals, "" for None; never "-0.0000" (a loss of -0.0, or a rounding
    of a tiny negative, reads as a sign the value does not have)."""
    if value is None:
        return ""
    text = f"{value:.4f}"
    return text.lstrip("-") if float(text) == 0 else text


def format_table(records: list[dict]) -> str:
    """The summary as an aligned text table, best first."""
    header = ["point", "status", "exit", "test_acc", "test_loss", "seconds", "overrides"]
    rows = [
        [
            str(r["point"]),
            r["status"],
            str(r["exit_code"]),
            _four_places(r["test_accuracy"]),
            _four_places(r["test_loss"]),
            f"{r['wall_seconds']:.0f}",
            r["overrides"],
        ]
        for r in _best_first(records)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def swept_values(records: list[dict]) -> dict[str, list]:
    """Override key -> the distinct values it took, for the keys that differ between points."""
    values: dict[str, list] = {}
    for record in records:
        for item in record["overrides"].split(" ") if record["overrides"] else []:
            key, _, value = item.partition("=")
            parsed = _parse(value)
            values.setdefault(key, [])
            if parsed not in values[key]:
                values[key].append(parsed)
    return {k: v for k, v in values.items() if len(v) > 1 and not k.startswith("hydra.")}


def _parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def write_hparams_experiment(sweep_dir: str, records: list[dict]) -> str | None:
    """TensorBoard's experiment-level HParams config at the sweep root: each swept key with the
    values it took as its domain. Named by the key's last part (train.learning_rate ->
    learning_rate), as each run names its own hparams. Returns the event file written."""
    swept = swept_values(records)
    if not swept:
        return None
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = [hp.HParam(key.rsplit(".", 1)[-1], _domain(values)) for key, values in swept.items()]
    summary = hp.hparams_config_pb(
        hparams=hparams, metrics=[hp.Metric("test_accuracy"), hp.Metric("test_loss")]
    )
    # Every hparam here took several values: mark it, for the tab's "differing only" filter.
    content = summary.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
    for info in data.experiment.hparam_infos:
        info.differs = True
    content.content = data.SerializeToString()
    folder = os.path.join(sweep_dir, ".hparams")
    shutil.rmtree(folder, ignore_errors=True)
    with tf.summary.create_file_writer(folder).as_default():
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
    (event_file,) = os.listdir(folder)
    # The event file belongs at the root, so TensorBoard's root run ('.') holds the experiment.
    final = os.path.join(sweep_dir, event_file)
    os.replace(os.path.join(folder, event_file), final)
    os.rmdir(folder)
    return final


def _domain(values: list):
    from tensorboard.plugins.hparams import api as hp

    if all(isinstance(v, bool) for v in values) or all(isinstance(v, str) for v in values):
        return hp.Discrete(values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return hp.Discrete([float(v) for v in values])
    return hp.Discrete([str(v) for v in values])


def _write(root: str, name: str, data: bytes) -> None:
    """Write a small file under `root`, a local folder or gs://bucket/prefix."""
    if root.startswith("gs://"):
        from trainer.gcs import WRITER_ROLE, client, retry, split_uri, user_errors

        bucket, prefix = split_uri(root, "output.dir")
        blob = f"{prefix.rstrip('/')}/{name}" if prefix else name
        with user_errors(root, "output.dir", WRITER_ROLE):
            client().bucket(bucket).blob(blob).upload_from_string(data, retry=retry())
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name), "wb") as f:
        f.write(data)
