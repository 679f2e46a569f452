"""What the tests share, by kind: session hygiene (hygiene.py), starting and stopping processes
(processes.py), generated data and the shared trained run (data.py), the composed config
(config.py). tests/conftest.py registers their fixtures and re-exports their helpers."""
