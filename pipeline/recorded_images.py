"""The image lists' digests a build last computed, kept in its folder so that a fully cached rebuild runs
without the images: a copied build folder, ImageNet unmounted, a laptop away from the dataset.

A digest stands in only for the same selection (seed and image counts); any stage that must be built
still reads the images and fails, naming the folder and the option, when they are not there.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cache import write_json_atomic


class RecordedImages:
    def __init__(self, path: Path, selection: dict):
        self.path = path
        self.selection = selection
        self._warned = False

    def _read(self) -> dict:
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return recorded if isinstance(recorded, dict) and recorded.get("selection") == self.selection else {}

    def get(self, name: str) -> str | None:
        """The digest of image list `name` recorded for this selection, if any."""
        digest = self._read().get("digests", {}).get(name)
        return digest if isinstance(digest, str) else None

    def put(self, name: str, digest: str, folder: str) -> None:
        """Record a digest computed from the images themselves (only into a build folder that exists)."""
        recorded = self._read()
        digests = {**recorded.get("digests", {}), name: digest} if recorded.get("folder") == folder else {name: digest}
        if digests == recorded.get("digests") or not self.path.parent.is_dir():
            return
        try:
            write_json_atomic(self.path, {"selection": self.selection, "folder": folder, "digests": digests})
        except OSError:  # a read-only or full build folder: the next rebuild needs its images, nothing worse
            pass

    def warn_once(self, reporter, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            folder = self._read().get("folder", "?")
            reporter.warn(f"{error}; using the image digests recorded when {folder} was read "
                          "(a stage that must be built needs the images)")
