"""A full disk or a file-size limit met while a stage writes: one line naming the folder and the space needed.

The stage's temporary folder is removed as for any failure, so nothing half-written is ever taken as
complete, and the stage's previous folder and the build's manifest are only replaced after a stage has
been written whole (`pipeline.cache`): the last good build stays usable. Python writers raise OSError
with ENOSPC / EFBIG; C++ writers (OpenVINO's `save_model`) raise a bare "iostream error", so those are
recognised by their effect instead: a file at the RLIMIT_FSIZE limit, or a filesystem left (almost)
without free space.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

from pipeline.errors import OutOfSpaceError

FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file reached the file-size limit",
        errno.EDQUOT: "the disk quota is used up"}
NEARLY_FULL = 1 << 20  # bytes: what a filesystem that just refused a write has left, at most


def cause(error: BaseException, folder: Path) -> int | None:
    """ENOSPC / EFBIG / EDQUOT if `error` (raised while writing into `folder`) came from a full disk or a limit."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and any(size >= limit for size in _file_sizes(folder)):
        return errno.EFBIG
    try:
        if shutil.disk_usage(folder).free < NEARLY_FULL:
            return errno.ENOSPC
    except OSError:
        pass
    return None


def out_of_space(code: int, root: Path, stage: str, written: int, previous: int | None) -> OutOfSpaceError:
    """The one line: what ran out, where, how much the stage needs, what to do."""
    needed = max(written, previous or 0)
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        why = f"{FULL[code]} (ulimit -f: {megabytes(limit)} per file)"
        advice = "raise the limit (ulimit -f) or build where it does not apply"
    else:
        why = f"{FULL[code]} ({megabytes(_free(root) + written)} free once its partial output is removed)"
        advice = "free some space or choose another --build-dir"
    if previous:
        size = f"about {megabytes(needed)}"
    elif written:
        size = f"more than the {megabytes(written)} it had written"
    else:
        size = "more space"
    return OutOfSpaceError(f"{root}: {why}: {stage} needs {size} there: {advice}, "
                           "then run the same command to continue")


def folder_bytes(folder: Path) -> int:
    return sum(_file_sizes(folder))


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _file_sizes(folder: Path) -> list[int]:
    sizes = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                sizes.append(os.lstat(os.path.join(dirpath, name)).st_size)
            except OSError:
                pass
    return sizes


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
