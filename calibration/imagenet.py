"""An ImageNet root in whichever of the common layouts it has: its class list, calibration and evaluation images.

Layouts accepted (`LAYOUTS` says it in one line for error messages):

- *Caffe* (this project's shared copy): `synsets.txt`, `train-sample/` or `train/` of `<wnid>/` folders,
  flat `val/` with `val.txt` (`<file name> <class index>`);
- *ImageFolder* (torchvision): `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`, no class list;
- *Kaggle* (ImageNet Object Localization Challenge): `LOC_synset_mapping.txt`, `LOC_val_solution.csv`
  (`ImageId,PredictionString`, the string starting with the wnid) and `ILSVRC/Data/CLS-LOC/{train,val}/`.

Class index i is line i of `synsets.txt` (or `LOC_synset_mapping.txt`); without one it is the i-th of the
sorted ImageNet-1k wnids, from the list shipped in the package (`imagenet_classes.txt`, which is
`synsets.txt`), so an ImageFolder copy with only some classes still gets ImageNet-1k labels. The train
images are read lazily (`calibration.class_folders`): a million-image train/ is never listed whole.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path

from calibration.class_folders import ClassFolders
from calibration.datasets import (
    SYNSETS_FILE, VAL_LABELS_FILE, DatasetScan, ImageRecord, Skipped, Synset, _checked_scan, _existing_folder,
    _is_image_file, _not_an_image_reason, _WNID, detect_layout, read_synsets, read_train_layout, read_val_layout,
)
from pipeline.errors import PipelineError

SHIPPED_CLASSES = Path(__file__).with_name("imagenet_classes.txt")
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_IMAGES = Path("ILSVRC", "Data", "CLS-LOC")
# Folder names tried, in order, under an ImageNet root (Kaggle's: under KAGGLE_IMAGES).
CALIBRATION_FOLDERS = ("train-sample", "train")
EVALUATION_FOLDERS = ("val",)
LAYOUTS = (f"expected one of these layouts: {SYNSETS_FILE} + train-sample/ or train/ + val/ with {VAL_LABELS_FILE} (Caffe); "
           f"train/<wnid>/ + val/<wnid>/ (ImageFolder); {KAGGLE_SYNSETS} + {KAGGLE_VAL_SOLUTION} + "
           f"{KAGGLE_IMAGES.as_posix()}/train, val (Kaggle); or one such train or val folder")


@dataclass(frozen=True)
class ImageNetData:
    """An ImageNet root: the class list, the calibration candidates and a held-out evaluation scan."""

    root: Path
    synsets: tuple[Synset, ...]
    calibration: ClassFolders | None
    evaluation: DatasetScan | None
    layout: str = "caffe"  # "caffe", "imagefolder" or "kaggle"

    @property
    def class_names(self) -> list[str]:
        return [s.short_name for s in self.synsets]

    @property
    def wnids(self) -> list[str]:
        return [s.wnid for s in self.synsets]

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        """What both scans skipped (the calibration side: as far as its class folders were listed)."""
        return tuple(problem for scan in (self.calibration, self.evaluation) if scan is not None for problem in scan.problems)

    @property
    def problems(self) -> tuple[str, ...]:
        """What both scans skipped, one line each ("<path>: <reason>")."""
        return tuple(str(problem) for problem in self.skipped)


def shipped_synsets() -> tuple[Synset, ...]:
    """The ImageNet-1k class list shipped in the package, in sorted-wnid order (torchvision's and timm's)."""
    synsets = tuple(read_synsets(SHIPPED_CLASSES))
    assert [s.wnid for s in synsets] == sorted(s.wnid for s in synsets), SHIPPED_CLASSES  # the index rule rests on it
    return synsets


def class_list(folder: Path) -> tuple[Synset, ...]:
    """`synsets.txt` (or Kaggle's mapping) in `folder` or its parent, else the shipped ImageNet-1k list."""
    for candidate in (folder / SYNSETS_FILE, folder.parent / SYNSETS_FILE, folder / KAGGLE_SYNSETS):
        if candidate.is_file():
            return tuple(read_synsets(candidate))
    return shipped_synsets()


def open_imagenet(root: str | os.PathLike) -> ImageNetData:
    """An ImageNet root in any of the `LAYOUTS`, or one train or val folder of one.

    Kaggle's `ILSVRC/Data/CLS-LOC` stands for its root. Pointed at a train-layout folder, that folder gives
    the calibration candidates and `evaluation` is None; pointed at a val-layout folder, it gives the
    evaluation scan and `calibration` is None.
    """
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{'not a folder' if root.exists() else 'folder not found'}: {root} ({LAYOUTS})")
    if root.absolute().parts[-3:] == KAGGLE_IMAGES.parts:  # Kaggle's image folder: its root is 3 levels up
        root = root.parents[2] if len(root.parts) >= 3 else root.absolute().parents[2]  # paths stay as given
    synsets = class_list(root)
    if (root / KAGGLE_SYNSETS).is_file() or (root / KAGGLE_IMAGES).is_dir():
        return _kaggle(root, synsets)

    layout = detect_layout(root)
    if layout == "train":
        return ImageNetData(root, synsets, ClassFolders(root, [s.wnid for s in synsets]), None)
    if layout == "val":
        return ImageNetData(root, synsets, None, read_val_layout(root, num_classes=len(synsets)))

    calibration_dir = next((root / n for n in CALIBRATION_FOLDERS if (root / n).is_dir()), None)
    evaluation_dir = next((root / n for n in EVALUATION_FOLDERS if (root / n).is_dir()), None)
    if calibration_dir is None and evaluation_dir is None:
        raise PipelineError(f"{root} is not an ImageNet folder: {LAYOUTS}")
    calibration = ClassFolders(calibration_dir, [s.wnid for s in synsets]) if calibration_dir else None
    evaluation, layout = None, "caffe"
    if evaluation_dir is not None:
        if (evaluation_dir / VAL_LABELS_FILE).is_file():
            evaluation = read_val_layout(evaluation_dir, num_classes=len(synsets))
        elif detect_layout(evaluation_dir) == "train":  # ImageFolder: val/<wnid>/
            scan = read_train_layout(evaluation_dir, [s.wnid for s in synsets])
            # Sampled by file name, as the flat val/ of the other layouts: the same images are evaluated.
            keyed = tuple(ImageRecord(r.path, r.label, r.path.name) for r in scan.records)
            evaluation, layout = replace(scan, layout="val", records=keyed), "imagefolder"
        else:
            raise PipelineError(f"{evaluation_dir} has neither {VAL_LABELS_FILE} nor <wnid>/ folders: {LAYOUTS}")
    return ImageNetData(root, synsets, calibration, evaluation, layout)


def _kaggle(root: Path, synsets: tuple[Synset, ...]) -> ImageNetData:
    images = root / KAGGLE_IMAGES
    train, val, solution = images / "train", images / "val", root / KAGGLE_VAL_SOLUTION
    if not train.is_dir() and not val.is_dir():
        raise PipelineError(f"{root}: no {KAGGLE_IMAGES.as_posix()}/train or val folder (Kaggle layout; {LAYOUTS})")
    if val.is_dir() and not solution.is_file():
        raise PipelineError(f"{root}: no {KAGGLE_VAL_SOLUTION} for {val} (Kaggle layout; {LAYOUTS})")
    calibration = ClassFolders(train, [s.wnid for s in synsets]) if train.is_dir() else None
    evaluation = read_kaggle_val(val, solution, [s.wnid for s in synsets]) if val.is_dir() else None
    return ImageNetData(root, synsets, calibration, evaluation, "kaggle")


def read_kaggle_val(folder: str | os.PathLike, solution: str | os.PathLike, wnids: list[str]) -> DatasetScan:
    """Flat val images labelled by Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, where the
    string is `<wnid> <box> [<wnid> <box>...]` and its first wnid is the image's class."""
    expected = f"expected flat images named by the ImageId column of {Path(solution).name}"
    folder = _existing_folder(folder, expected)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    labels: dict[str, int] = {}
    problems: list[Skipped] = []
    with open(solution, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        if [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise PipelineError(f"{solution}: expected the header 'ImageId,PredictionString', got {','.join(header)!r}")
        for number, row in enumerate(rows, start=2):
            wnid = row[1].split()[0] if len(row) >= 2 and row[1].split() else ""
            if not _WNID.fullmatch(wnid) or not row[0].strip():
                problems.append(Skipped(Path(solution), f"line {number}: expected '<ImageId>,<wnid> ...', got {','.join(row)!r}, skipped", "bad val solution line"))
            elif wnid not in index:
                problems.append(Skipped(Path(solution), f"line {number}: {wnid} is not in the class list, skipped", "label out of range"))
            else:
                labels.setdefault(row[0].strip(), index[wnid])
    records = []
    for file in sorted(folder.iterdir()):
        if not _is_image_file(file):
            problems.append(Skipped(file, _not_an_image_reason(file), "not an image file"))
        elif file.stem in labels:
            records.append(ImageRecord(file, labels[file.stem]))
        else:
            problems.append(Skipped(file, f"not listed in {Path(solution).name} (no label), skipped", f"missing from {Path(solution).name}"))
    return _checked_scan(folder, "val", records, problems, expected)
