"""Deterministic, seeded, class-balanced selection of calibration and evaluation images.

The "random" order is a sort by sha256(seed, key), not a random-number generator: it gives the
same selection on every Python and numpy version and on every machine (the host and a Jetson
must agree on which images were used). The key of an image is its path relative to the common
folder of all candidates, so the selection does not depend on where the dataset lives nor on
the filesystem's listing order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from calibration.datasets import ImageRecord
from calibration.images import file_sha256
from pipeline.errors import PipelineError


def select_balanced(records: Iterable[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    """Up to `n` images, round-robin over the classes in a seeded order.

    Each class's images are taken in a seeded order, one per class per round, so the first k
    images of a selection are themselves balanced (a selection of 64 is a prefix of one of 128
    with the same seed). Unlabelled images (label None) form one group of their own: a folder of
    camera frames is simply a seeded sample. Fewer than `n` candidates: all of them are returned
    (check the length, or call `require_at_least`).
    """
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    records = sorted(records, key=lambda r: (r.path, -1 if r.label is None else r.label))
    keys = _relative_keys(records)
    by_class: dict[int | None, list[ImageRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    class_order = sorted(by_class, key=lambda label: _seeded(seed, "class", str(label)))
    queues = [sorted(by_class[c], key=lambda r: _seeded(seed, "image", keys[r])) for c in class_order]

    rounds = max((len(q) for q in queues), default=0)
    round_robin = [q[i] for i in range(rounds) for q in queues if i < len(q)]
    return round_robin[:n]


def require_at_least(records: Sequence[ImageRecord], n: int, what: str) -> None:
    """PipelineError when fewer than `n` images are left, e.g. `what="calibration images"`."""
    if len(records) < n:
        where = f" in {_common_folder(records)}" if records else ""
        raise PipelineError(
            f"too few {what}: {len(records)} usable{where}, need at least {n}: "
            "add images there or ask for fewer"
        )


def assert_disjoint(calibration: Iterable[ImageRecord], evaluation: Iterable[ImageRecord]) -> None:
    """PipelineError naming a file that is both a calibration and an evaluation image.

    Compares resolved paths (the same file reached twice, symlinks included) and file contents
    (the same image copied under another name).
    """
    calibration, evaluation = list(calibration), list(evaluation)
    calibration_paths = {r.path.resolve(): r.path for r in calibration}
    for record in evaluation:
        if record.path.resolve() in calibration_paths:
            raise PipelineError(
                f"{record.path} is both a calibration and an evaluation image: "
                "calibrate and evaluate on separate folders"
            )
    by_size: dict[int, list[Path]] = {}
    for record in calibration:
        by_size.setdefault(os.path.getsize(record.path), []).append(record.path)
    calibration_hashes: dict[str, Path] | None = None
    for record in evaluation:
        if os.path.getsize(record.path) not in by_size:
            continue  # files of different sizes cannot be equal: most files are never hashed
        if calibration_hashes is None:
            calibration_hashes = {
                file_sha256(path): path for paths in by_size.values() for path in paths
            }
        twin = calibration_hashes.get(file_sha256(record.path))
        if twin is not None:
            raise PipelineError(
                f"evaluation image {record.path} is a copy of calibration image {twin}: "
                "calibrate and evaluate on separate images"
            )


def _seeded(seed: int, kind: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{kind}\0{key}".encode()).digest()


def _relative_keys(records: list[ImageRecord]) -> dict[ImageRecord, str]:
    if not records:
        return {}
    root = _common_folder(records)
    return {r: r.key or Path(os.path.relpath(r.path.absolute(), root)).as_posix() for r in records}


def _common_folder(records: Sequence[ImageRecord]) -> Path:
    # absolute(), not resolve(): a symlinked image must not drag the common folder up to "/".
    return Path(os.path.commonpath([r.path.absolute().parent for r in records]))
