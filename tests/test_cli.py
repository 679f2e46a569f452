"""What a user sees of the commands themselves: where a run leaves its log and Hydra's files, what
it leaves when it fails, what TensorFlow prints on a CPU machine, and `--help`."""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
import threading

import pytest

from tests.conftest import SMALL, last_error_line, run_module, run_trainer, trainer_env
from trainer import (
    BelowMinAccuracy,
    Diverged,
    Interrupted,
    LostPeer,
    Preempted,
    TimeLimitReached,
    TrainerError,
)

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures

NO_GPU = pytest.mark.skipif(
    bool(glob.glob("/dev/nvidia*")), reason="a GPU machine may rightly print CUDA lines"
)
TF_NOISE = re.compile(r"^E\d{4} |Could not find cuda drivers|absl::InitializeLog", re.MULTILINE)


def test_local_output_dir_holds_the_log_and_hydra_config_and_no_outputs_folder(trained_run):
    """Also when output.dir existed before the run (the shared run makes it first): a
    successful run keeps train.log and .hydra/ there, only a run that wrote nothing undoes them."""
    root = trained_run.out.parent  # the run's working directory
    log = (trained_run.out / "train.log").read_text()
    assert "found 2 classes" in log and f"exported to {trained_run.out}/saved_model" in log
    assert (trained_run.out / ".hydra" / "overrides.yaml").exists()
    assert not (root / "outputs").exists()


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["data.train_dir=no/such/folder"], "data.train_dir=no/such/folder: folder not found"),
        (["data.image_size=3"], "data.image_size=3: must be >= 32"),
    ],
)
@pytest.mark.parametrize("output_dir", ["runs/first", None])
def test_a_run_that_fails_before_training_leaves_no_folder(
    trained_run, tmp_path, overrides, says, output_dir
):
    data = [f"data.train_dir={trained_run.train_dir}", *SMALL]
    out = [f"output.dir={output_dir}"] if output_dir else []
    result = run_trainer(*data, *out, *overrides, cwd=tmp_path)
    assert result.returncode == 2 and says in last_error_line(result)
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/TIME, no runs/first


def _state(folder):
    """Every path under `folder` with its modification time and, for a file, its bytes."""
    return {p: (p.stat().st_mtime_ns, p.is_file() and p.read_bytes()) for p in folder.rglob("*")}


def test_a_refused_run_leaves_the_finished_run_as_it_was(trained_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run.out, out)
    before = _state(out)
    result = run_trainer(
        f"data.train_dir={trained_run.train_dir}", f"output.dir={out}", "seed=7", cwd=tmp_path
    )
    assert result.returncode == 2 and "holds the outputs of an earlier run" in result.stderr
    assert _state(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@NO_GPU
def test_a_cpu_run_prints_no_tensorflow_startup_errors(trained_run, tmp_path):
    assert not TF_NOISE.findall(trained_run.result.stderr), trained_run.result.stderr[:2000]
    env = trainer_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a user runs it: nothing set
    image = next(trained_run.test_dir.glob("*/*.jpg"))
    result = run_module("trainer.predict", str(trained_run.out), str(image), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not TF_NOISE.findall(result.stderr), result.stderr[:2000]


@NO_GPU
def test_tensorboard_through_the_trainer_starts_without_tensorflow_startup_lines(tmp_path):
    from scripts.gcs_emulator import free_port

    board = subprocess.Popen(
        [sys.executable, "-m", "trainer.tensorboard", "--logdir", str(tmp_path)]
        + ["--host", "127.0.0.1", "--port", str(free_port())],
        cwd=tmp_path,
        # TensorBoard records itself in TMPDIR/.tensorboard-info: keep that in the test's folder
        env=trainer_env(TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    printed = []
    try:
        timer = threading.Timer(120, board.kill)  # a hung start fails the test, not the suite
        timer.start()
        for line in board.stderr:
            printed.append(line)
            if line.startswith("TensorBoard ") and " at http://127.0.0.1:" in line:
                break
    finally:
        timer.cancel()
        board.kill()
        board.wait(timeout=30)
    assert printed and printed[-1].startswith("TensorBoard "), "".join(printed)
    assert not TF_NOISE.findall("".join(printed)), "".join(printed)


def test_on_a_gpu_machine_cuda_lines_still_show():
    from trainer.quiet import _is_noise

    lines = [
        "I0000 00:00:1795851835.991770   11725 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1795851841.824867   11725 cuda_platform.cc:52] failed call to cuInit: 303",
    ]
    assert not any(_is_noise(line, 2, gpu_machine=True) for line in lines)
    assert all(_is_noise(line, 2, gpu_machine=False) for line in lines)
    assert not _is_noise("E0000 00:00:1.0 1 op.cc:1] some other error", 2, gpu_machine=False)


def test_tensorflow_loads_without_the_optional_packages_the_trainer_never_uses(tmp_path):
    # scikit-learn and SciPy come with ".[dev]": Keras and TensorFlow would import them at
    # start-up (~0.5 s), as they would IPython where installed, for features the trainer never
    # uses. The trainer's commands import TensorFlow without them; later imports still work.
    printed = _import_as_the_job(
        tmp_path,
        after="from trainer.quiet import OPTIONAL_IMPORTS\n"
        "print(sorted(n for n in OPTIONAL_IMPORTS if n in sys.modules))\n"
        "import sklearn.linear_model\n"
        "print(keras.layers.Dense(2)(keras.ops.ones((1, 3))).shape)\n",
    )
    assert printed == ["[]", "(1, 2)"]


def test_the_collector_stays_out_of_the_tensorflow_import_and_works_after_it(tmp_path):
    # Python's collector walked the hundreds of thousands of objects the import creates several
    # times while it ran (~0.1 s of every start); they live as long as the process, so the
    # trainer pauses it during the import and freezes them out of later passes.
    printed = _import_as_the_job(
        tmp_path,
        before="passes = []\ngc.callbacks.append(lambda phase, info: passes.append(phase))\n",
        after="print(len(passes), gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
        "class Cycle: pass\n"
        "cycle = Cycle(); cycle.me = cycle; del cycle\n"
        "print(gc.collect() > 0)\n",  # garbage made after the import is still collected
    )
    assert printed == ["0 True True", "True"]


def _import_as_the_job(tmp_path, *, before: str = "", after: str) -> list[str]:
    """In a fresh process, import keras (which imports tensorflow) as the job does, after
    quiet_tensorflow_startup; `before` and `after` run around it. Its stdout lines."""
    script = (
        "import gc, sys\n"
        "from trainer.quiet import quiet_tensorflow_startup\n"
        "quiet_tensorflow_startup()\n"
        f"{before}import keras\n{after}"
    )
    result = _python_c(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_an_error_exits_at_once_though_work_still_runs_on_another_thread(tmp_path):
    # The bad-image scan decodes on a thread of its own while the model is built. When the
    # build fails (weights that do not fit, a misspelt train.finetune_from), the one-line error
    # must not wait for a scan of the whole dataset: a thread that never ends stands in for it.
    script = (
        "import threading, trainer.__main__ as m\n"
        "threading.Thread(target=threading.Event().wait, name='bad-image-scan').start()\n"
        "m.main()\n"
    )
    result = _python_c(script, f"data.train_dir={tmp_path / 'missing'}", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("missing: folder not found")


def _python_c(script: str, *args: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c script args...` with this checkout's trainer, output captured."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_trainer_help_says_what_it_is_as_the_user_types_it(tmp_path):
    # The console script `trainer` calls trainer.__main__:main with argv[0] "trainer".
    console_script = "import sys, trainer.__main__ as m; sys.argv[0] = 'trainer'; m.main()"
    for result in (
        run_module("trainer", "--help", cwd=tmp_path),
        _python_c(console_script, "--help", cwd=tmp_path),
    ):
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[0]
        assert first.startswith("python -m trainer (installed: trainer): fine-tune ResNet50")
        assert "powered by Hydra" not in result.stdout
        assert "train_dir: null" in result.stdout  # then the config a user overrides


def test_predict_help_says_what_it_is_as_the_user_types_it(tmp_path):
    result = run_module("trainer.predict", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("usage: python -m trainer.predict ")
    assert lines[1].startswith("Classify images with a trained run's exported model")
    assert "predict.py" not in result.stdout


def test_gcs_output_dir_gets_the_log_with_the_outputs(emulator, trained_run, tmp_path):
    """For gs://, Hydra's run directory is the local folder the run uploads from."""
    emulator.client().create_bucket("cli-log")
    out = "gs://cli-log/runs/first"
    result = run_trainer(
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={out}",
        f"storage.cache_dir={tmp_path / 'cache'}",
        "train.epochs=1",
        *SMALL,
        cwd=tmp_path,
        env=trainer_env(STORAGE_EMULATOR_HOST=emulator.url),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no outputs/DATE/TIME
    names = set(emulator.names(out))
    assert "_SUCCESS" in names
    assert "train.log" in names
    assert (
        "found 2 classes"
        in emulator.client().bucket("cli-log").blob("runs/first/train.log").download_as_text()
    )


@pytest.mark.parametrize(
    "error, code, line",
    [
        (TrainerError("data.train_dir=x: folder not found"), 2, "trainer: error: data.train_dir="),
        (BelowMinAccuracy("test accuracy 0.5 is below"), 3, "trainer: test accuracy 0.5 is below"),
        (LostPeer("UnavailableError: gone"), 4, "trainer: lost a peer worker: UnavailableError"),
        (TimeLimitReached("train.max_hours=1 reached"), 5, "trainer: train.max_hours=1 reached"),
        (Diverged("the training loss became nan"), 6, "trainer: diverged: the training loss"),
        (Preempted("SIGTERM"), 143, "trainer: stopped: SIGTERM; to resume, run: python -m trainer"),
        (Interrupted("SIGINT"), 130, "trainer: interrupted (Ctrl-C): SIGINT; to resume, run: "),
    ],
)
def test_each_error_of_the_job_is_its_exit_code_and_one_line(
    error, code, line, cfg, monkeypatch, capsys
):
    """What `python -m trainer` does with each error `run(cfg)` raises (the tests of the job
    assert the error; this, what a user and the Job's podFailurePolicy then see)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tests.conftest import compose_config
    from trainer import job
    from trainer.__main__ import _hydra_main

    def fails(cfg, **_):
        raise error

    monkeypatch.setattr(job, "run", fails)
    # What Hydra sets in a running app: the command line's overrides, which the stop lines repeat
    app = compose_config("data.train_dir=x", "train.epochs=7", hydra=True)
    app.hydra.runtime.output_dir = cfg.output.dir  # the run's folder, as Hydra sets it at start
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.masked_copy(app, "hydra"))
    cfg.data.train_dir = "x"
    with pytest.raises(SystemExit) as exited:
        _hydra_main(cfg)
    assert exited.value.code == code == error.exit_code
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith(line)
    if code in (5, 130, 143):  # the command that resumes: the same overrides, this output.dir
        resume = f"python -m trainer data.train_dir=x train.epochs=7 output.dir={cfg.output.dir}"
        assert said.endswith(f"; to resume, run: {resume}")


def test_a_run_leaves_no_autograph_modules_in_its_temp_dir(tmp_path):
    """The trainer's fast exit skips TensorFlow's atexit clean-up of the modules autograph
    writes to the temp dir: it removes the ones of its own process itself."""
    from tests.conftest import make_folders
    from tests.support.hygiene import AUTOGRAPH_TEMP_FILES

    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=4)
    temp = tmp_path / "temp"
    temp.mkdir()
    other = temp / f"{AUTOGRAPH_TEMP_FILES}someone_else.py"  # another process's: kept
    other.write_text("")
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={tmp_path / 'out'}",
        "train.epochs=1",
        *SMALL,
        cwd=tmp_path,
        env=trainer_env(TMPDIR=str(temp)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in temp.iterdir()) == [other.name]


def test_tensorboard_on_gcs_without_credentials_is_one_line_exit_2(tmp_path):
    """Not an empty page while TensorBoard's data server panics: the trainer's GCS client
    tries the folder first. No emulator, and credentials that point nowhere."""
    env = {k: v for k, v in trainer_env().items() if k != "STORAGE_EMULATOR_HOST"}
    env |= {"HOME": str(tmp_path), "TMPDIR": str(tmp_path)}  # no gcloud login of the machine's
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "missing.json")
    result = run_module(
        "trainer.tensorboard", "--logdir", "gs://bucket/runs", cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_error_line(result).startswith(
        "trainer.tensorboard: error: --logdir=gs://bucket/runs: no Google Cloud credentials"
    )
    assert "panicked" not in result.stderr and "Traceback" not in result.stderr
