"""A bundle's files checked against its manifest before anything runs them (device side, Python 3.10).

Every listed file must exist with its recorded size (always checked: a truncated copy is caught for the
cost of a `stat`) and, by default, its recorded SHA-256. Hashing a large model on every camera start
would be slow, so a file whose hash matched is remembered in `<bundle>/.verified.json` by its size,
mtime and ctime: the next start re-hashes only files whose metadata changed. (ctime cannot be set back by
`touch` or `os.utime`, so a byte flipped with the mtime restored is still re-hashed.) A read-only bundle
simply re-hashes every time. Entries are not trusted while a file's mtime is within the last few seconds
(the "racy git" rule: a write in the same clock tick would not change the mtime).

Unlisted files under `models/` and `golden/` are refused too: they hold what runs and what it is judged
on, and a bundle never gains files there after the build (device-build writes `engines/`, verify writes
`results/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError

HASH_CACHE = ".verified.json"
CLOSED_FOLDERS = ("models", "golden")  # no file may appear there after the build
RACY_SECONDS = 2.0


def check_bundle_files(root: Path, manifest: dict, hashes: bool = True) -> None:
    """Raise one PipelineError naming the first missing, truncated, altered or unlisted file."""
    listed = manifest.get("files", {})
    sizes = manifest.get("sizes", {})  # bundles written before sizes were recorded have none
    cache = _read_cache(root) if hashes else {}
    fresh: dict[str, dict] = {}
    for relative, digest in listed.items():
        file = root / relative
        try:
            stat = file.stat()
        except OSError:
            stat = None
        if stat is None or not file.is_file():
            raise PipelineError(f"{file}: missing from the bundle: copy the whole bundle (or its .tar.gz) again")
        if relative in sizes and stat.st_size != sizes[relative]:
            raise PipelineError(f"{file}: truncated or altered ({stat.st_size} bytes, the bundle manifest says "
                                f"{sizes[relative]}): copy the bundle again")
        if not hashes:
            continue
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "sha256": digest}
        if cache.get(relative) == stamp:
            fresh[relative] = stamp
            continue
        if sha256_file(file) != digest:
            raise PipelineError(f"{file}: damaged (sha256 differs from the bundle manifest): copy the bundle again")
        if time.time() - stat.st_mtime_ns / 1e9 > RACY_SECONDS and time.time() - stat.st_ctime_ns / 1e9 > RACY_SECONDS:
            fresh[relative] = stamp
    for folder in CLOSED_FOLDERS:
        for file in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else ():
            if file.is_file() and str(file.relative_to(root)) not in listed:
                raise PipelineError(f"{file}: not part of the bundle (its manifest does not list it): remove it, "
                                    "or copy the bundle again")
    if hashes and fresh != cache:
        _write_cache(root, fresh)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(root: Path) -> dict:
    try:
        data = json.loads((root / HASH_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(root: Path, entries: dict) -> None:
    """Best effort: a read-only bundle (or a full disk) only costs re-hashing next time."""
    try:
        handle, temp = tempfile.mkstemp(dir=root, prefix=f"{HASH_CACHE}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(entries, stream, indent=1, sort_keys=True)
        os.replace(temp, root / HASH_CACHE)
    except OSError:
        Path(temp).unlink(missing_ok=True)
