"""One writer per build folder: the lock that `build`, `clean` and `report` hold while they write.

The lock is `filelock`'s (an OS lock, `flock` on Linux): the kernel releases it when its process dies,
however it dies, so a killed build never leaves a stale lock. While the lock is held, nothing else
writes the folder, so every temporary folder found there belongs to a process that is gone and may be
swept. Builds of other models or targets take other locks and run in parallel.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.cache import write_json_atomic
from pipeline.errors import BusyError, PipelineError
from pipeline.layout import holder_file, lock_file


@contextmanager
def folder_lock(root: Path, wait: bool = True, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of build folder `root`; wait for it (saying who holds it) or, if not `wait`, raise BusyError."""
    root = Path(root)
    try:
        lock_file(root).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file(root), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = describe_holder(root)
            if not wait:
                raise BusyError(f"{root} is in use by {holder}: wait for it to finish, or run again without --no-wait") from None
            say(f"waiting for {root}: in use by {holder} (Ctrl-C stops waiting)")
            lock.acquire()
    except OSError as error:
        raise PipelineError(f"build directory {lock_file(root).parent.parent} cannot be written ({error.strerror}): "
                            "choose another with --build-dir") from None
    try:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json_atomic(holder_file(root), mine)
        except OSError:  # a full disk: the lock holds all the same, only waiters cannot say by whom
            pass
        yield
    finally:
        holder_file(root).unlink(missing_ok=True)
        lock.release()


def describe_holder(root: Path) -> str:
    """'pid 123 on host h since <time>', from the holder's note (the note may lag the lock by a moment)."""
    try:
        holder = json.loads(holder_file(root).read_text())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"
