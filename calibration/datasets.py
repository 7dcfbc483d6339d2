"""ImageNet data on disk: readers for the standard layouts, without decoding an image.

Three folder layouts are read (`calibration.imagenet` finds them under an ImageNet root):

- *train* layout: `<root>/<wnid>/<image>`, labelled by the wnid's line in `synsets.txt`;
- *val* layout: flat image files plus `val.txt` with lines `<file name> <0-based class index>`;
- *unlabelled*: every image under a folder, searched recursively (a camera's frames are often
  kept in per-day or per-camera subfolders), label None.

Scanning never decodes images: it lists files and reports what it skipped (unknown class
folders, non-image files, bad `val.txt` lines) in `DatasetScan.problems`; `calibration.images`
decodes them. Records are always sorted by path, so results never depend on the filesystem's
listing order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from pipeline.errors import PipelineError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VAL_LABELS_FILE = "val.txt"
SYNSETS_FILE = "synsets.txt"

_WNID = re.compile(r"n\d{8}")
_TRAIN_EXPECTED = "expected <wnid>/<image> subfolders (ImageNet train layout)"
_VAL_EXPECTED = f"expected image files plus {VAL_LABELS_FILE} with lines '<file name> <class index>'"


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int | None = None  # 0-based class index in synsets.txt order; None when unlabelled
    # What seeded sampling orders the image by; None: its path below the candidates' common folder. Set where
    # a layout nests images that another keeps flat (ImageFolder's val/<wnid>/), so both select the same images.
    key: str | None = field(default=None, compare=False)


class Skipped(NamedTuple):
    """A file (or val.txt line) left out, and why; `kind` is the short reason counted in the manifest."""

    path: Path
    reason: str
    kind: str = "other"

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Synset(NamedTuple):
    wnid: str
    name: str  # the full text after the wnid: "tench, Tinca tinca"

    @property
    def short_name(self) -> str:
        return self.name.split(",")[0].strip()


@dataclass(frozen=True)
class DatasetScan:
    """The images found under one folder, sorted by path, plus what was skipped."""

    root: Path
    layout: str  # "train", "val" or "unlabelled"
    records: tuple[ImageRecord, ...]
    problems: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return labels_array(self.records)

    @property
    def num_classes_present(self) -> int:
        return len({r.label for r in self.records if r.label is not None})


def read_synsets(path: str | os.PathLike) -> list[Synset]:
    """`synsets.txt`: line i (0-based) is class i, `<wnid> <name>[, <synonym>...]`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"class list not found: {path} (expected one '<wnid> <name>' line per class)")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    synsets: list[Synset] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        wnid, _, name = line.strip().partition(" ")
        if not _WNID.fullmatch(wnid) or not name.strip():
            # Line i is class i: a bad line would shift every later label, so it is an error.
            raise PipelineError(f"{path}:{number}: expected '<wnid> <name>', got {line.strip()!r}")
        if wnid in seen:
            raise PipelineError(f"{path}:{number}: {wnid} is listed twice (first on line {seen[wnid]})")
        seen[wnid] = number
        synsets.append(Synset(wnid, name.strip()))
    if not synsets:
        raise PipelineError(f"class list is empty: {path} (expected one '<wnid> <name>' line per class)")
    return synsets


def read_train_layout(root: str | os.PathLike, wnids: Sequence[str]) -> DatasetScan:
    """`<root>/<wnid>/<image>`; folders whose name is not in `wnids` are skipped and reported."""
    root = _existing_folder(root, _TRAIN_EXPECTED)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    records: list[ImageRecord] = []
    problems: list[Skipped] = []
    for entry in _sorted_entries(root):
        if not entry.is_dir():
            problems.append(Skipped(entry, "not inside a class folder, skipped", "not in a class folder"))
        elif entry.name not in index:
            problems.append(Skipped(entry, "folder name is not a wnid of the class list, skipped", "unknown class folder"))
        else:
            for file in _sorted_entries(entry):
                if _is_image_file(file):
                    records.append(ImageRecord(file, index[entry.name]))
                else:
                    problems.append(Skipped(file, _not_an_image_reason(file), "not an image file"))
    return _checked_scan(root, "train", records, problems, _TRAIN_EXPECTED)


def read_val_layout(
    root: str | os.PathLike, num_classes: int = 1000, labels_file: str = VAL_LABELS_FILE
) -> DatasetScan:
    """Flat image files plus `val.txt`; bad lines and unlisted images are skipped and reported."""
    root = _existing_folder(root, _VAL_EXPECTED)
    labels_path = root / labels_file
    if not labels_path.is_file():
        raise PipelineError(f"no {labels_file} in {root}: {_VAL_EXPECTED}")
    records: dict[str, ImageRecord] = {}
    problems: list[Skipped] = []
    mentioned: set[str] = set()  # names on any line, good or bad: not reported again as unlisted
    for number, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            mentioned.add(line.strip().rsplit(maxsplit=1)[0])
            record, problem, kind = _parse_val_line(line, root, num_classes, records)
            if problem:
                problems.append(Skipped(labels_path, f"line {number}: {problem}, skipped", kind))
            else:
                records[record.path.name] = record
    for file in _sorted_entries(root):
        if file.name == labels_file or file.name in mentioned:
            continue
        if _is_image_file(file):
            problems.append(Skipped(file, f"not listed in {labels_file} (no label), skipped", f"missing from {labels_file}"))
        else:
            problems.append(Skipped(file, _not_an_image_reason(file), "not an image file"))
    ordered = sorted(records.values(), key=lambda r: r.path)
    return _checked_scan(root, "val", ordered, problems, _VAL_EXPECTED)


def read_unlabelled_folder(root: str | os.PathLike) -> DatasetScan:
    """Every image under `root`, recursively (subfolders per camera or per day), label None."""
    expected = "expected image files (.jpg, .png, ...) in it or its subfolders"
    root = _existing_folder(root, expected)
    records: list[ImageRecord] = []
    problems: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if _is_image_file(file):
                records.append(ImageRecord(file, None))
            else:
                problems.append(Skipped(file, _not_an_image_reason(file), "not an image file"))
    records.sort(key=lambda r: r.path)
    return _checked_scan(root, "unlabelled", records, problems, expected)


def detect_layout(folder: str | os.PathLike) -> str:
    """"val" when `val.txt` is present, "train" when it holds wnid folders, else "unlabelled"."""
    folder = Path(folder)
    if (folder / VAL_LABELS_FILE).is_file():
        return "val"
    if folder.is_dir() and any(e.is_dir() and _WNID.fullmatch(e.name) for e in folder.iterdir()):
        return "train"
    return "unlabelled"


def scan_folder(folder: str | os.PathLike, synsets: Sequence[Synset] | None = None) -> DatasetScan:
    """Read a folder in whichever layout it has; `synsets` is looked up beside it when not given."""
    folder = Path(folder)
    layout = detect_layout(folder)
    if layout == "unlabelled":
        return read_unlabelled_folder(folder)
    if synsets is None:
        synsets_path = _find_synsets(folder)
        if synsets_path is None:
            if layout == "train":
                raise PipelineError(
                    f"no {SYNSETS_FILE} in {folder} or its parent: the class folders need it to get "
                    "their class indices; put the ImageNet class list there"
                )
        else:
            synsets = read_synsets(synsets_path)
    if layout == "train":
        return read_train_layout(folder, [s.wnid for s in synsets])
    return read_val_layout(folder, num_classes=len(synsets) if synsets else 1000)


def _parse_val_line(
    line: str, root: Path, num_classes: int, seen: dict[str, ImageRecord]
) -> tuple[ImageRecord | None, str | None, str]:
    """One `val.txt` line -> (record, None, ""), or (None, what is wrong with it, its kind)."""
    # rsplit: a file name may contain spaces, the class index never does.
    fields = line.strip().rsplit(maxsplit=1)
    if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
        return None, f"expected '<file name> <class index>', got {line.strip()!r}", "bad val.txt line"
    name, label = fields[0], int(fields[1])
    if Path(name).name != name or name in (".", ".."):
        return None, f"{name!r} is not a plain file name in {root}", "bad val.txt line"
    if not 0 <= label < num_classes:
        return None, f"class index {label} is outside 0..{num_classes - 1}", "label out of range"
    if name in seen:
        return None, f"{name} is listed more than once (the first line wins)", "listed twice in val.txt"
    if not (root / name).is_file():
        return None, f"{name} does not exist in {root}", "listed but missing"
    return ImageRecord(root / name, label), None, ""


def _existing_folder(root: str | os.PathLike, expected: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise PipelineError(f"folder not found: {root} ({expected})")
    if not root.is_dir():
        raise PipelineError(f"not a folder: {root} ({expected})")
    return root


def _checked_scan(root: Path, layout: str, records, problems, expected: str) -> DatasetScan:
    if not records:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise PipelineError(f"no usable images in {root}: {expected}{detail}")
    return DatasetScan(root, layout, tuple(records), tuple(problems))


def _sorted_entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _not_an_image_reason(path: Path) -> str:
    if path.is_dir():
        return "unexpected subfolder, skipped"
    return f"not an image file ({path.suffix or 'no suffix'}), skipped"


def _find_synsets(folder: Path) -> Path | None:
    for candidate in (folder / SYNSETS_FILE, folder.parent / SYNSETS_FILE):
        if candidate.is_file():
            return candidate
    return None


def labels_array(records: Iterable[ImageRecord]) -> np.ndarray:
    return np.asarray([-1 if r.label is None else r.label for r in records], dtype=np.int64)
