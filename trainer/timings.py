"""metrics.json's `timings`: the seconds of each step of the job, named here once, in the job's
order (README's Outputs section lists them; scripts/benchmark.py reads them instead of the log),
and the stopwatch that records them. No TensorFlow, no trainer imports."""

from __future__ import annotations

import os
import time

# key -> what it times. Keys of steps a run did not take are absent (finetune_s without
# fine-tuning, startup_s outside the command line's first run, report_s and export_s before
# the export).
STEPS = {
    # given by the command line (run's startup_s), for its first run only
    "startup_s": "process start to the job's start: Python, imports, Hydra's config",
    "inputs_s": "output.dir checked, inputs staged, folders listed and split",
    "runtime_s": "TensorFlow imported, the strategy started, output.dir prepared",
    "build_s": "the model built, while the bad-image scan decodes beside it",
    "bad_images_s": "the scan's rest, its findings agreed and undecodable images left out",
    "sample_batch_s": "TensorBoard's sample batch",
    "backbone_pass_s": "the backbone's features of both splits (or the feature cache's)",
    "head_s": "training the head",
    "finetune_s": "fine-tuning",
    "evaluate_s": "the serving model built and evaluated on the test set",
    "report_s": "TensorBoard's test report and HParams",
    "export_s": "the SavedModel export",
}


class Stopwatch:
    """The run's clock: `started` (time.perf_counter()), and in `timings` the seconds of its
    consecutive steps: `lap(key)` records the time since the last lap (or the start) as `key`;
    `restart()` begins a lap without recording the one before (steps that timed themselves)."""

    def __init__(self, *, startup_s: float | None = None):
        self.started = self.last = time.perf_counter()
        self.timings: dict[str, float] = {} if startup_s is None else {"startup_s": startup_s}

    def lap(self, key: str) -> None:
        assert key in STEPS, key
        now = time.perf_counter()
        self.timings[key] = now - self.last
        self.last = now

    def restart(self) -> None:
        self.last = time.perf_counter()


def for_metrics(timings: dict[str, float], *, cache_outcome: str) -> dict:
    """metrics.json's `timings`: each step's seconds, rounded to the millisecond, and under
    `feature_cache` whether the backbone pass came from storage.feature_cache (`cache_outcome`:
    hit | miss | off)."""
    return {**{k: round(v, 3) for k, v in timings.items()}, "feature_cache": cache_outcome}


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: from /proc, 10 ms steps); None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # The fields after the command name, which may hold ')' itself.
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks since boot
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return None
