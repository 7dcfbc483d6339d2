"""Ctrl-C (SIGINT) and SIGTERM stop a command the same way: as an exception raised in the main thread.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process on the spot, which would skip
every `finally`: the interrupted stage's temporary folder would stay behind and the lock note would go
stale. With `signals_raise()`, both unwind normally: temporary folders are removed, the build folder's lock
is released, finished stages are kept, and the command exits 128 + the signal number (130, 143).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command; `stage` is where a build was (None outside a stage)."""

    def __init__(self, signum: int = signal.SIGINT, stage: str | None = None):
        super().__init__(signum, stage)
        self.signum = signum
        self.stage = stage

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        where = f" in {self.stage}" if self.stage else ""
        return f"interrupted{where}; run the same command to continue"


_received: list[int] = []  # the signals _raise saw: code that catches our exception and raises a plain
# KeyboardInterrupt in its place (Ray's ray.wait / ray.get do) must not turn SIGTERM into SIGINT


def _raise(signum, frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while the block runs (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():  # a command run from a worker thread
        yield
        return
    previous = {number: signal.signal(number, _raise) for number in SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def at_stage(error: KeyboardInterrupt, stage: str | None) -> Interrupted:
    """The same interruption, naming the stage it stopped (a plain KeyboardInterrupt counts as SIGINT)."""
    signum = error.signum if isinstance(error, Interrupted) else (_received[-1] if _received else signal.SIGINT)
    return Interrupted(signum, (error.stage if isinstance(error, Interrupted) else None) or stage)
