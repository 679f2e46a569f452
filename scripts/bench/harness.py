"""Run each row in its own child process and measure it: wall seconds (process start to exit),
CPU seconds and peak RSS from `os.wait4`; the trainer's accuracy and phase times from the
`metrics.json` it published (its `timings`), never from its log.

With --data DIR --weights PATH the rows run on DIR's folders instead of generated data, every
one with PATH's weights, and each reports its class count and conv1 kernel digest (REAL_KEYS)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

from . import CLASSES, ENTRY, KEYS, REPO

# metrics.json's timings, in the job's order: (key, the phase it times). README's Outputs
# section says what each covers.
PHASES = (
    ("startup_s", "start-up: Python, imports, Hydra's config"),
    ("inputs_s", "inputs: output.dir checked, images staged, listed and split"),
    ("runtime_s", "import TensorFlow, start the runtime"),
    ("build_s", "build model (the bad-image scan decodes meanwhile)"),
    ("bad_images_s", "the bad-image scan's rest: agreed between workers, bad images left out"),
    ("sample_batch_s", "TensorBoard sample batch"),
    ("backbone_pass_s", "backbone pass: train and test sets"),
    ("head_s", "head training"),
    ("finetune_s", "fine-tuning"),
    ("evaluate_s", "evaluation on the test set"),
    ("report_s", "TensorBoard report"),
    ("export_s", "export SavedModel"),
)
# Process start to the bad-image scan's first decode: the trainer's fixed start-up cost.
STARTUP = ("startup_s", "inputs_s", "runtime_s")
REST = "the rest: publishing the outputs, process exit"


def benchmark(args: argparse.Namespace, work: str) -> dict:
    """Generate the data (or count --data's), then measure the floor, the trainer, both recipes
    and the sweep in turn (those not skipped); the figures of the --json file."""
    started_utc = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()
    if args.data:
        data, generation_s = args.data, 0.0
        counts = count_data(data)
    else:
        data = os.path.join(work, "data")
        counts, generation_s = make_data(args=args, data=data)
    rows = [r for r in ("floor", "trainer", "keras_guide", "seed_recipe") if r not in args.skip]
    rows += ["sweep"] if args.sweep else []
    results = {name: measure(name, args=args, data=data, work=work) for name in rows}
    figures = {
        **row_figures(results),
        "skipped": args.skip,
        "train_images": counts["train"],
        "test_images": counts["test"],
        "image_size": args.image_size,
        "epochs": args.epochs,
        "weights": args.weights or "random init (weights=None / model.weights=null) everywhere",
        "machine": machine(),
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
        "started_utc": started_utc,
        "dataset_generation_s": round(generation_s, 1),
        **(real_figures(results, data=data, classes=counts["classes"]) if args.data else {}),
    }
    unknown = set(figures) - set(KEYS)
    assert not unknown, f"keys missing from scripts/bench/__init__.py's lists: {unknown}"
    return {key: figures[key] for key in KEYS if key in figures}


def row_figures(results: dict) -> dict:
    """Seconds, CPU seconds, peak RSS and accuracy of each measured row, and what the trainer,
    the floor and the sweep reported besides."""
    figures = {}
    for name, result in results.items():
        figures[f"{name}_s"] = round(result["seconds"], 2)
        figures[f"{name}_cpu_s"] = round(result["cpu_s"], 2)
        if name != "floor":
            figures[f"{name}_peak_rss_mb"] = round(result["rss_mb"], 1)
        if "accuracy" in result:
            figures[f"{name}_accuracy"] = round(result["accuracy"], 4)
    timings = results["trainer"]["timings"]
    figures |= {
        "trainer_backbone_s": timings.get("backbone_pass_s"),
        "trainer_head_s": timings.get("head_s"),
        "trainer_export_s": timings.get("export_s"),
        "trainer_startup_s": results["trainer"]["startup_s"],
        "trainer_feature_cache": timings.get("feature_cache"),
        "trainer_phases_s": results["trainer"]["phases"],
    }
    if "sweep" in results:
        figures |= {
            "sweep_points": results["sweep"]["points"],
            "sweep_backbone_passes": results["sweep"]["backbone_passes"],
        }
    if "floor" in results:
        floor = results["floor"]
        figures |= {
            "floor_batch_size": floor["batch_size"],
            "floor_folded_s": round(floor["folded_seconds"], 2),
            "floor_folded_cpu_s": round(floor["folded_cpu_s"], 2),
        }
    return figures


def real_figures(results: dict, *, data: str, classes: int) -> dict:
    """REAL_KEYS: the folders and their class count; each measured row's class count and conv1
    digest; where the seed recipe's 1000-way top came from."""
    figures = {"data": data, "classes": classes}
    for name in ("trainer", "keras_guide", "seed_recipe"):
        if name in results:
            figures[f"{name}_classes"] = results[name]["classes"]
            figures[f"{name}_conv1_digest"] = results[name]["conv1_digest"]
    if "seed_recipe" in results:
        figures["seed_recipe_top"] = results["seed_recipe"]["top"]
    return figures


def count_data(data: str) -> dict:
    """{"train": images, "test": images, "classes": class folders} of --data's folders (their
    train/ and test/ have the same class folders: benchmark.py checks)."""
    folders = {split: class_folders(os.path.join(data, split)) for split in ("train", "test")}
    from trainer.images import is_image  # what the trainer counts as an image, no TensorFlow

    counts = {"classes": len(folders["train"])}
    for split in ("train", "test"):
        counts[split] = sum(
            is_image(name)
            for folder in folders[split]
            for name in os.listdir(os.path.join(data, split, folder))
        )
    print(
        f"dataset: {counts['train']} train + {counts['test']} test images, "
        f"{counts['classes']} classes, from {data}",
        flush=True,
    )
    return counts


def class_folders(root: str) -> list[str]:
    """The class folders under `root`, sorted."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def make_data(*, args: argparse.Namespace, data: str) -> tuple[dict, float]:
    """The two-class JPEG dataset under `data`; return the image counts per split and seconds."""
    from trainer.synthetic import make_dataset

    t0 = time.perf_counter()
    counts = {}
    for split, n, seed in (("train", args.train_images, 0), ("test", args.test_images, 1)):
        shutil.rmtree(os.path.join(data, split), ignore_errors=True)
        paths = make_dataset(
            os.path.join(data, split),
            CLASSES,
            n // len(CLASSES),
            min_size=300,
            max_size=500,
            seed=seed,
        )
        counts[split] = len(paths)
    counts["classes"] = len(CLASSES)
    generation_s = time.perf_counter() - t0
    print(
        f"dataset: {counts['train']} train + {counts['test']} test JPEGs (300-500 px) "
        f"in {generation_s:.0f} s, under {data}",
        flush=True,
    )
    return counts, generation_s


def measure(name: str, *, args: argparse.Namespace, data: str, work: str) -> dict:
    """Run one row in its own child process; return its seconds, CPU seconds, peak RSS and what
    it reported (accuracy; the trainer's phases; the floor's batch size)."""
    log_path = os.path.join(work, f"{name}.log")
    result_path = os.path.join(work, f"{name}.json")
    out = os.path.join(work, "trainer-out")
    if name == "trainer":
        command = trainer_command(args=args, data=data, out=out, work=work)
        if args.weights:  # the same run, noting the conv1 kernel it loaded (bench/probe.py)
            command = [sys.executable, "-m", "scripts.bench.probe", result_path, *command[3:]]
    elif name == "sweep":
        command = sweep_command(args=args, data=data, work=work)
    else:
        command = recipe_command(name, args=args, data=data, result_path=result_path)
    print(f"measuring {name} ...", flush=True)
    seconds, cpu_s, rss_mb = run_measured(command, log_path, cwd=work)
    if name == "trainer":
        result = trainer_result(out=out, seconds=seconds, log_path=log_path)
        if args.weights:
            result |= probed(result_path, log_path=log_path)
    elif name == "sweep":
        result = sweep_result(points=args.sweep, work=work, log_path=log_path)
    else:
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
    if name == "floor":  # the timed pass alone, not the child's start-up
        seconds, cpu_s = result["seconds"], result["cpu_s"]
    print(f"  {name}: {seconds:.1f} s, {cpu_s:.1f} CPU s, peak RSS {rss_mb:.0f} MB", flush=True)
    return {"seconds": seconds, "rss_mb": rss_mb, **result, "cpu_s": cpu_s}


def probed(result_path: str, *, log_path: str) -> dict:
    """What scripts/bench/probe.py noted of the trainer's run: its conv1 kernel digest."""
    if not os.path.exists(result_path):
        raise SystemExit(f"the trainer loaded no weights file (no {result_path}); see {log_path}")
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)


def recipe_command(name: str, *, args: argparse.Namespace, data: str, result_path: str):
    """`benchmark.py _recipe NAME ...`: one recipe (scripts/bench/recipes.py) in a child."""
    return [
        sys.executable,
        ENTRY,
        "_recipe",
        name,
        *("--train-dir", os.path.join(data, "train"), "--test-dir", os.path.join(data, "test")),
        *("--image-size", str(args.image_size), "--epochs", str(args.epochs)),
        *("--result", result_path),
        *(("--weights", args.weights) if args.weights else ()),
    ]


def trainer_command(*, args: argparse.Namespace, data: str, out: str, work: str) -> list[str]:
    """`python -m trainer` on the benchmark's data, as a user would run it."""
    return [
        sys.executable,
        "-m",
        "trainer",
        f"data.train_dir={data}/train",
        f"data.test_dir={data}/test",
        f"model.weights={args.weights or 'null'}",
        f"train.epochs={args.epochs}",
        f"data.image_size={args.image_size}",
        f"output.dir={out}",
        f"storage.feature_cache={work}/features",  # empty: a first run, the store included
        f"hydra.run.dir={work}/hydra",
    ]


def sweep_grid(points: int) -> tuple[list[float], list[float]]:
    """(learning rates, dropouts) of a `points`-point grid: two dropouts when `points` is
    even, rates halving from 1e-3."""
    dropouts = [0.2, 0.5] if points % 2 == 0 else [0.2]
    return [1e-3 * 0.5**i for i in range(points // len(dropouts))], dropouts


def sweep_command(*, args: argparse.Namespace, data: str, work: str) -> list[str]:
    """`python -m trainer -m` over head-only keys on the benchmark's data: point i writes to
    {work}/sweep/i (output.dir follows Hydra's sweep folder), all share one feature cache."""
    rates, dropouts = sweep_grid(args.sweep)
    return [
        sys.executable,
        "-m",
        "trainer",
        "-m",
        f"data.train_dir={data}/train",
        f"data.test_dir={data}/test",
        f"model.weights={args.weights or 'null'}",
        f"train.epochs={args.epochs}",
        f"data.image_size={args.image_size}",
        "train.learning_rate=" + ",".join(f"{rate:g}" for rate in rates),
        "model.dropout=" + ",".join(f"{dropout:g}" for dropout in dropouts),
        f"storage.feature_cache={work}/sweep-features",
        f"hydra.sweep.dir={work}/sweep",
    ]


def sweep_result(*, points: int, work: str, log_path: str) -> dict:
    """The sweep's point count (every point must have finished) and how many of its points ran
    the backbone pass (their features not all in the shared cache; 1: the points shared them)."""
    passes = 0
    for index in range(points):
        metrics = published_metrics(os.path.join(work, "sweep", str(index)), log_path=log_path)
        passes += metrics["timings"].get("feature_cache") != "hit"
    return {"points": points, "backbone_passes": passes}


def trainer_result(*, out: str, seconds: float, log_path: str) -> dict:
    """The trainer's accuracy and phase times, from its published run (which must be complete):
    `seconds` is the process' wall time, start to exit."""
    metrics = published_metrics(out, log_path=log_path)
    timings = metrics["timings"]
    startup = [timings[key] for key in STARTUP if key in timings]
    return {
        "accuracy": metrics["test_accuracy"],
        "classes": len(metrics["classes"]),
        "timings": timings,
        "phases": trainer_phases(timings, total_s=seconds),
        # process start to the first image decoded (the bad-image scan starts decoding)
        "startup_s": round(sum(startup), 2) if len(startup) == len(STARTUP) else None,
    }


def published_metrics(out: str, *, log_path: str) -> dict:
    """metrics.json of the finished run in `out`; SystemExit naming the log when it is not."""
    if not os.path.exists(os.path.join(out, "_SUCCESS")):
        raise SystemExit(f"the trainer wrote no _SUCCESS in {out}; see {log_path}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def trainer_phases(timings: dict, *, total_s: float) -> dict:
    """{phase: seconds} of the trainer's run, in the job's order, from metrics.json's timings;
    what they leave of the process' `total_s` is the last phase, REST."""
    phases = {label: round(timings[key], 2) for key, label in PHASES if key in timings}
    phases[REST] = round(max(0.0, total_s - sum(phases.values())), 2)
    return phases


def run_measured(command: list[str], log_path: str, cwd: str) -> tuple[float, float, float]:
    """Run `command` to completion with its output in `log_path`; return (wall seconds from
    process start to exit, its CPU seconds, its own peak RSS in MB). Raise if it fails.

    CPU seconds (user + system, all threads) barely move when other processes load the machine,
    while wall seconds do: the CPU ratios are the ones to trust on a shared machine."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # The checkout this script lives in is the trainer measured, whatever is pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        raise SystemExit(f"{' '.join(command[:4])} ... exited {child.returncode}:\n{tail}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # maxrss in KiB


def machine() -> str:
    """Cores, CPU model, memory, OS and Python of this machine, for the report's footer."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
        memory = f", {mem_gb:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        memory = ""
    return (
        f"{os.cpu_count()} CPU cores ({cpu}){memory}, no GPU, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )
