"""The artifact cache: one folder per stage, complete only when its `stage.json` exists.

A stage writes into a temporary sibling folder, which is renamed into place; `stage.json` (the cache
key and the size and SHA-256 of every file) is written into it last, before the rename, so a build
killed at any moment leaves either a complete stage or one that is rebuilt. A lookup re-hashes the
files, so a truncated or tampered artifact is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifact import sha256_file

MARKER = "stage.json"


def stable_hash(value: Any) -> str:
    """SHA-256 of a JSON-able value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_arrays_atomic(path: Path, arrays: dict) -> None:
    """Named numpy arrays as one .npz next to its destination, then renamed: readers never see half a file."""
    import numpy as np

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            np.savez(stream, **dict(arrays))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_arrays(path: Path) -> dict | None:
    """The arrays `write_arrays_atomic` wrote, by name; None where there is no such file."""
    import numpy as np

    if not Path(path).is_file():
        return None
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON next to its destination, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as stream:
            json.dump(value, stream, indent=2, sort_keys=False, default=str)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StageRecord:
    """A completed stage: its folder and the contents of its stage.json."""

    folder: Path
    data: dict

    @property
    def key(self) -> str:
        return self.data["key"]

    def path(self, name: str) -> Path:
        return self.folder / name

    @classmethod
    def read(cls, folder: Path) -> StageRecord:
        """The record of a finished stage folder (its stage.json), for code that reads a build."""
        return cls(folder, json.loads((folder / MARKER).read_text()))


@dataclass(frozen=True)
class Lookup:
    record: StageRecord | None
    reason: str  # why the cache missed ("" on a hit)


class ArtifactCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def lookup(self, stage: str, key: str) -> Lookup:
        folder = self.root / stage
        marker = folder / MARKER
        if not marker.exists():
            reason = "interrupted earlier" if folder.exists() else "not built yet"
            return Lookup(None, reason)
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            return Lookup(None, "its stage.json is unreadable")
        if data.get("key") != key:
            return Lookup(None, "its inputs, settings or tools changed")
        for name, expected in data.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                return Lookup(None, f"{name} is missing")
            if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
                return Lookup(None, f"{name} was modified or truncated")
        return Lookup(StageRecord(folder, data), "")

    @contextmanager
    def building(self, stage: str) -> Iterator[Path]:
        """A fresh temporary folder for a stage's outputs; removed if the stage fails."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.", suffix=".tmp"))
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, stage: str, key: str, tmp: Path, info: dict) -> StageRecord:
        """Complete a finished temporary folder with its marker, then swap it into place.

        The marker is written inside the temporary folder, so a failure while writing it (a full disk)
        leaves the stage's previous folder untouched; after that only renames follow, which need no space.
        """
        files = {
            str(path.relative_to(tmp)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        data = {"stage": stage, "key": key, "files": files, **info}
        write_json_atomic(tmp / MARKER, data)
        folder = self.root / stage
        if folder.exists():
            # Move the old folder aside first so the rename below never meets a non-empty target.
            stale = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.", suffix=".old"))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
        return StageRecord(folder, data)

    def lookup_size(self, stage: str) -> int | None:
        """Bytes of the stage's last complete folder (from its marker), None if there is none."""
        try:
            files = json.loads((self.root / stage / MARKER).read_text())["files"]
            return sum(entry["size"] for entry in files.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def sweep_leftovers(self) -> None:
        """Remove temporary folders of builds that were killed.

        Called under the build folder's lock (`pipeline.lock`): every writer of this folder holds it, so any
        temporary folder found here belongs to a process that is gone, never to one still writing."""
        if self.root.exists():
            for path in [*self.root.glob(".*.tmp"), *self.root.glob(".*.old")]:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:  # a temporary file of write_json_atomic (manifest.json)
                    path.unlink(missing_ok=True)
