"""DataLoader workers leave stop signals to their parent process.

`timeout`, Slurm's scancel and Ctrl-C in a terminal signal every process of the job at once, the DataLoader workers
included. A worker that dies of SIGTERM or SIGINT makes its parent fail with "DataLoader worker ... is killed by
signal" at its next batch, before it can save; so workers ignore the stop signals and the parent, which handles
them (save, then stop), shuts its workers down as it exits. A worker still ends with its parent: PyTorch's workers
watch the parent and exit when it is gone, and SIGKILL cannot be ignored.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: this worker ignores SIGTERM, SIGINT and SIGUSR1 (its parent handles them)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
