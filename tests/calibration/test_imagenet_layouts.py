"""ImageNet in the layouts people have (Caffe, ImageFolder, Kaggle) gives the same labels, and a train/ tree is
sampled lazily with the same selection as a full listing.

Each layout is a temporary tree of symlinks to the shared images (IMAGENET_DIR, default ../shared/imagenet):
nothing is copied into the repository.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import pytest

from calibration.class_folders import ClassFolders
from calibration.datasets import read_synsets, read_train_layout
from calibration.imagenet import LAYOUTS, SHIPPED_CLASSES, open_imagenet, shipped_synsets
from calibration.sampling import select_balanced
from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGENET_DIR = Path(os.environ.get("IMAGENET_DIR", REPO_ROOT.parent / "shared" / "imagenet"))

needs_imagenet = pytest.mark.skipif(
    not (IMAGENET_DIR / "val" / "val.txt").is_file(),
    reason=f"ImageNet test images not found at {IMAGENET_DIR} (set IMAGENET_DIR)",
)


@pytest.fixture(scope="module")
def caffe():
    """Today's layout, the shared folder itself: the labels every other layout must reproduce."""
    return open_imagenet(IMAGENET_DIR)


def by_name(scan) -> dict[str, int]:
    return {record.path.name: record.label for record in scan.records}


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target)


def imagefolder_tree(root: Path, caffe) -> Path:
    """torchvision's ImageFolder: train/<wnid>/ and val/<wnid>/, no class list."""
    for folder in sorted((IMAGENET_DIR / "train-sample").iterdir()):
        link(folder, root / "train" / folder.name)
    for record in caffe.evaluation.records:
        link(record.path, root / "val" / caffe.wnids[record.label] / record.path.name)
    return root


def kaggle_tree(root: Path, caffe, mapping: bool = True) -> Path:
    """Kaggle's ImageNet Object Localization Challenge: LOC_* files and ILSVRC/Data/CLS-LOC/{train,val}/."""
    images = root / "ILSVRC" / "Data" / "CLS-LOC"
    for folder in sorted((IMAGENET_DIR / "train-sample").iterdir()):
        link(folder, images / "train" / folder.name)
    rows = []
    for record in caffe.evaluation.records:
        link(record.path, images / "val" / record.path.name)
        wnid = caffe.wnids[record.label]
        rows.append(f"{record.path.stem},{wnid} 12 30 200 180 {wnid} 5 6 90 100")  # one box or more, as Kaggle's
    random.Random(0).shuffle(rows)  # Kaggle's file is in no particular order
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if mapping:
        link(IMAGENET_DIR / "synsets.txt", root / "LOC_synset_mapping.txt")  # the same '<wnid> <names>' lines
    return root


# ---------------------------------------------------------------------------- the class list shipped


def test_shipped_class_list_is_the_shared_synsets_in_sorted_wnid_order():
    shipped = shipped_synsets()
    assert len(shipped) == 1000 and [s.wnid for s in shipped] == sorted(s.wnid for s in shipped)
    assert shipped[0].short_name == "tench" and shipped[472].short_name == "canoe"
    if (IMAGENET_DIR / "synsets.txt").is_file():
        assert list(shipped) == read_synsets(IMAGENET_DIR / "synsets.txt")


def test_the_wheel_carries_the_class_list(tmp_path):
    from pipeline.stages.bundle.package import write_wheel

    wheel, why = write_wheel(tmp_path / "wheel")
    if wheel is None:
        pytest.skip(why)
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist()
    assert f"calibration/{SHIPPED_CLASSES.name}" in names


# ---------------------------------------------------------------------------- every layout, the same labels


@needs_imagenet
def test_imagefolder_without_a_class_list_gives_todays_labels(tmp_path, caffe):
    data = open_imagenet(imagefolder_tree(tmp_path, caffe))
    assert data.layout == "imagefolder" and not (tmp_path / "synsets.txt").exists()
    assert by_name(data.evaluation) == by_name(caffe.evaluation) and len(data.evaluation) == 650
    assert by_name(data.calibration) == by_name(caffe.calibration) and len(data.calibration) == 1000
    assert data.class_names == caffe.class_names
    assert data.problems == ()


@pytest.mark.parametrize("mapping", [True, False], ids=["with LOC_synset_mapping", "shipped class list"])
@needs_imagenet
def test_kaggle_layout_gives_todays_labels(tmp_path, caffe, mapping):
    data = open_imagenet(kaggle_tree(tmp_path, caffe, mapping))
    assert data.layout == "kaggle"
    # its image folder stands for the root (the report finds the root from an image's path up to val/)
    assert by_name(open_imagenet(tmp_path / "ILSVRC" / "Data" / "CLS-LOC").evaluation) == by_name(data.evaluation)
    assert by_name(data.evaluation) == by_name(caffe.evaluation) and len(data.evaluation) == 650
    assert by_name(data.calibration) == by_name(caffe.calibration)
    assert data.class_names == caffe.class_names and data.problems == ()


@needs_imagenet
def test_kaggle_solution_problems_are_reported(tmp_path, caffe):
    root = kaggle_tree(tmp_path, caffe)
    solution = root / "LOC_val_solution.csv"
    lines = solution.read_text().splitlines()
    dropped = lines.pop(1).split(",")[0]  # an image the CSV does not list
    lines += ["ILSVRC2012_val_99999999,n99999999 1 2 3 4", "broken line"]
    solution.write_text("\n".join(lines) + "\n")

    data = open_imagenet(root)

    assert len(data.evaluation) == 649 and dropped not in {r.path.stem for r in data.evaluation.records}
    kinds = sorted(problem.kind for problem in data.skipped)
    assert kinds == ["bad val solution line", "label out of range", "missing from LOC_val_solution.csv"]
    assert any(dropped in line and "not listed in LOC_val_solution.csv" in line for line in data.problems)


def build_images(imagenet: Path) -> dict[str, list[tuple[str, int]]]:
    """The images a build reads (BuildContext), by file name and label: evaluation, calibration, gate decision."""
    from pipeline.config import load_config
    from pipeline.context import BuildContext
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter

    config = load_config(overrides={"data": {"imagenet": str(imagenet), "calibration_images": 64},
                                    "quantization": {"decision_images": 32}})
    ctx = BuildContext(BuildPlan(config, "efficientnet_lite0"), Reporter())
    return {part: [(r.path.name, r.label) for r in getattr(ctx, f"{part}_records")]
            for part in ("evaluation", "calibration", "decision")}


@needs_imagenet
def test_a_build_reads_the_same_images_from_every_layout(tmp_path, caffe):
    today = build_images(IMAGENET_DIR)
    assert [len(today[part]) for part in ("calibration", "decision")] == [64, 32]
    assert build_images(imagefolder_tree(tmp_path / "imagefolder", caffe)) == today
    assert build_images(kaggle_tree(tmp_path / "kaggle", caffe, mapping=False)) == today


# ---------------------------------------------------------------------------- errors


def test_a_folder_in_no_layout_is_a_one_line_error_naming_the_option_path_and_layouts(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["build", "--model", "efficientnet_lite0", "--imagenet", str(tmp_path / "empty"),
                 "--build-dir", str(tmp_path / "build"), "--no-report"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--imagenet / IMAGENET_DIR" in error and str(tmp_path / "empty") in error and LAYOUTS in error


@pytest.mark.parametrize("make, expected", [
    (lambda root: (root / "ILSVRC" / "Data" / "CLS-LOC" / "val").mkdir(parents=True), "no LOC_val_solution.csv"),
    (lambda root: (root / "val").mkdir(), "has neither val.txt nor <wnid>/ folders"),
])
def test_incomplete_layouts_say_what_is_missing(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(PipelineError) as excinfo:
        open_imagenet(tmp_path)
    message = str(excinfo.value)
    assert expected in message and LAYOUTS in message and "\n" not in message


# ---------------------------------------------------------------------------- a large train/, sampled lazily


@pytest.fixture
def train_tree(tmp_path):
    """60 class folders of 1 to 5 images each (symlinks to shared images), so selections take several rounds."""
    sources = sorted((IMAGENET_DIR / "train-sample").glob("*/*.JPEG"))
    wnids = [s.wnid for s in shipped_synsets()]
    for c in range(60):
        for i in range(1 + c % 5):
            link(sources[(7 * c + i) % len(sources)], tmp_path / wnids[c] / f"{wnids[c]}_{i}.JPEG")
    return tmp_path, wnids


@needs_imagenet
@pytest.mark.parametrize("n", [0, 1, 17, 60, 150, 180, 500])
def test_lazy_selection_equals_the_full_listings(train_tree, n):
    root, wnids = train_tree
    everything = read_train_layout(root, wnids).records
    assert len(everything) == 180
    assert ClassFolders(root, wnids).select(n, seed=3) == select_balanced(everything, n, seed=3)


@needs_imagenet
def test_lazy_selection_with_images_left_out_equals_the_full_listings(train_tree):
    root, wnids = train_tree
    everything = read_train_layout(root, wnids).records
    pool = ClassFolders(root, wnids)
    calibration = pool.select(70, seed=0)
    taken = {r.path for r in calibration}
    rest = [r for r in everything if r.path not in taken]
    assert pool.select(50, seed=0, exclude=taken) == select_balanced(rest, 50, seed=0)
    assert not taken & {r.path for r in pool.select(50, seed=0, exclude=taken)}


@needs_imagenet
def test_lazy_selection_lists_only_the_class_folders_it_reaches(train_tree):
    root, wnids = train_tree
    pool = ClassFolders(root, wnids)
    assert pool.listed == 0
    assert len(pool.select(10, seed=0)) == 10 and pool.listed == 10  # one image from each of 10 classes
    assert len(pool.select(180, seed=0)) == 180 and pool.listed == 60


@needs_imagenet
def test_the_shared_train_sample_selects_as_before(caffe):
    """The real 1000-class folder: the lazy pool picks what the full listing picked (the builds' caches hold)."""
    everything = read_train_layout(IMAGENET_DIR / "train-sample", caffe.wnids).records
    pool = ClassFolders(IMAGENET_DIR / "train-sample", caffe.wnids)
    first = pool.select(512, seed=0)
    assert first == select_balanced(everything, 512, seed=0) and pool.listed == 512
    rest = [r for r in everything if r not in set(first)]
    assert pool.select(480, seed=0, exclude={r.path for r in first}) == select_balanced(rest, 480, seed=0)
