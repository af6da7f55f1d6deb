"""Preemption: SIGTERM or SIGINT asks the run to stop at the next step boundary.

A TPU VM (and Kubernetes, SLURM, systemd) announces preemption with SIGTERM
and kills the process some seconds later; Ctrl-C sends SIGINT. Either one
only sets a flag here. The loop looks at it between steps, saves a checkpoint
and raises `Preempted`; `python -m train` then exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT), the status a shell reports for a
process the signal ended, so supervisors see the same thing, but nothing is
lost: rerun the same command with --resume.

A second signal while the first is pending stops at once (the default action:
KeyboardInterrupt for SIGINT, termination for SIGTERM). If that lands in the
middle of a checkpoint save, orbax's temporary directory is left behind and
ignored, as after `kill -9`.

With several processes (a multi-host pod slice) every process must stop at
the same step, or the collective checkpoint save would hang: the flag is
combined across processes at each boundary.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving its progress."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Guard:
    """`with Guard() as g:` installs the handlers (main thread only; elsewhere
    signals keep their usual effect) and restores the previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Guard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write, not print: a handler that prints while the interrupted code
        # is printing raises "reentrant call" in the io buffer.
        os.write(2, f"\n{signal.Signals(signum).name} received: saving a checkpoint after this "
                    "step, then exiting (send it again to exit at once)\n".encode())

    def stop_requested(self) -> bool:
        """Whether any process got a signal; a collective when there are several."""
        if jax.process_count() == 1:
            return self.signum is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(
            self.signum or 0, np.int32))
        if self.signum is None and flags.any():
            self.signum = int(flags[flags > 0][0])
        return bool(flags.any())

    def preempted(self, message: str) -> Preempted:
        name = signal.Signals(self.signum).name
        return Preempted(f"{name} received; {message}; continue with the same command "
                         "and --resume", self.signum)
