"""The test suite's fixtures, registered from tests/support/ by kind:

- tests/support/hygiene.py: session hygiene (`nothing_left_behind`, autouse) and
  `in_process_run` (a process as a fresh one would be, for a test that runs job code here);
- tests/support/processes.py: the trainer's commands as subprocesses, deadlines, stopping;
- tests/support/data.py: generated image folders and the shared `trained_run`;
- tests/support/config.py: the one composed config, `cfg` (and `compose_config`, `configure`).

Where a test goes: a test of what the job does (outputs, metrics.json, the SavedModel,
TensorBoard) calls `run(cfg)` in this process, in the file of the module it is about
(test_train.py, test_data.py, test_model.py, ...); a test starts `python -m trainer` (or
predict) only where the process is the behaviour: exit codes and the one-line stderr
(test_cli.py, test_config.py), signals (test_resume.py), several workers (test_distribute.py,
test_paths.py), sweeps (test_sweep.py), the launcher and README's commands. TF_CONFIG and the
Indexed Job environment are parsed in test_cluster.py; gs:// tests use tests/gcs_emulator.py.
"""

from __future__ import annotations

from tests.support.config import (  # noqa: F401 - fixtures and helpers the test modules use
    cfg,
    compose_config,
    composed_config,
    configure,
)
from tests.support.data import (  # noqa: F401
    CLASSES,
    SMALL,
    Run,
    corrupt_files,
    make_folders,
    trained_run,
)
from tests.support.hygiene import in_process_run, nothing_left_behind  # noqa: F401
from tests.support.processes import (  # noqa: F401
    REPO,
    Lines,
    free_ports,
    last_error_line,
    run_module,
    run_trainer,
    seconds_to_exit_after_kill,
    start_trainer,
    stop,
    stopped_on_exit,
    trainer_env,
    wait_for_text,
)
