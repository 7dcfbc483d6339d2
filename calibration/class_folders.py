"""A class-folder tree (`<root>/<wnid>/<image>`, ImageNet's train/) read lazily.

A full ImageNet train/ holds 1.28 million files: listing and sorting all of them before picking a few
hundred calibration images takes minutes on a network disk. Here the class folders are listed up front
(1000 names), and a class's images only when a selection reaches that class: a selection of n <= 1000
images lists n folders. `select` returns exactly what `sampling.select_balanced` returns on the whole
listing (same seeded class order, same seeded order within a class, one image per class per round).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from calibration.datasets import (ImageRecord, Skipped, _TRAIN_EXPECTED, _checked_scan, _existing_folder, _is_image_file,
                                  _not_an_image_reason)
from calibration.sampling import _seeded


class ClassFolders:
    """The calibration candidates of a class-folder tree; quacks like a `DatasetScan` where one is read."""

    layout = "train"

    def __init__(self, root: str | os.PathLike, wnids: Sequence[str]):
        self.root = _existing_folder(root, _TRAIN_EXPECTED)
        index = {wnid: i for i, wnid in enumerate(wnids)}
        self._problems: list[Skipped] = []  # grows as class folders are listed
        self.classes: dict[int, Path] = {}
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir():
                self._problems.append(Skipped(entry, "not inside a class folder, skipped", "not in a class folder"))
            elif entry.name not in index:
                self._problems.append(Skipped(entry, "folder name is not a wnid of the class list, skipped",
                                              "unknown class folder"))
            else:
                self.classes[index[entry.name]] = entry
        if not self.classes:
            _checked_scan(self.root, "train", [], self._problems, _TRAIN_EXPECTED)  # raises, naming the first problem
        self._listed: dict[int, list[ImageRecord]] = {}
        self._queues: dict[tuple[int, int], list[ImageRecord]] = {}

    @property
    def problems(self) -> tuple[Skipped, ...]:
        """What was skipped: the top level at once, a class folder's files once it is listed."""
        return tuple(self._problems)

    @property
    def listed(self) -> int:
        """How many class folders have been listed so far."""
        return len(self._listed)

    def images_of(self, label: int) -> list[ImageRecord]:
        """One class's images, sorted by path, listed on first use (its non-images join `problems`)."""
        if label not in self._listed:
            records = []
            for file in sorted(Path(entry.path) for entry in os.scandir(self.classes[label])):
                if _is_image_file(file):
                    records.append(ImageRecord(file, label))
                else:
                    self._problems.append(Skipped(file, _not_an_image_reason(file), "not an image file"))
            self._listed[label] = records
        return self._listed[label]

    def select(self, n: int, seed: int, exclude: Iterable[Path] = ()) -> list[ImageRecord]:
        """Up to `n` images, balanced and seeded as `select_balanced`, leaving out the paths in `exclude`."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        exclude = set(exclude)
        order = sorted(self.classes, key=lambda label: _seeded(seed, "class", str(label)))
        queues: dict[int, list[ImageRecord]] = {}  # a class's queue, listed when first reached

        def queue(label: int) -> list[ImageRecord]:
            if label not in queues:
                queues[label] = [r for r in self._queue(label, seed) if r.path not in exclude]
            return queues[label]

        chosen: list[ImageRecord] = []
        for round_ in range(n):  # a round takes at most one image per class: n rounds always suffice
            took = False
            for label in order:
                if round_ < len(queue(label)):
                    chosen.append(queue(label)[round_])
                    took = True
                    if len(chosen) == n:
                        return chosen
            if not took:
                break
        return chosen

    def _queue(self, label: int, seed: int) -> list[ImageRecord]:
        # The key of an image is its path below the root, as select_balanced's relative keys are when the
        # candidates span two or more class folders.
        if (label, seed) not in self._queues:
            self._queues[(label, seed)] = sorted(
                self.images_of(label), key=lambda r: _seeded(seed, "image", f"{r.path.parent.name}/{r.path.name}"))
        return self._queues[(label, seed)]

    # --- the DatasetScan view (lists every class folder: for small trees and tests) ---

    @property
    def records(self) -> tuple[ImageRecord, ...]:
        return tuple(sorted((r for label in self.classes for r in self.images_of(label)), key=lambda r: r.path))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes_present(self) -> int:
        return sum(1 for label in self.classes if self.images_of(label))
