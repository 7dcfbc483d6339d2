"""ImageNet readers, image loading, sampling and digests, on the real shared ImageNet files.

The images are read from IMAGENET_DIR (default: ../shared/imagenet beside the repository) and
never copied into the repository; edge cases are built in tmp_path from a few real JPEGs.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from calibration.datasets import (
    ImageRecord,
    read_synsets,
    read_train_layout,
    read_unlabelled_folder,
    read_val_layout,
    scan_folder,
)
from calibration.imagenet import open_imagenet
from calibration.images import iter_batches, load_images, records_digest
from calibration.preprocess import Preprocessing
from calibration.sampling import assert_disjoint, require_at_least, select_balanced
from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGENET_DIR = Path(os.environ.get("IMAGENET_DIR", REPO_ROOT.parent / "shared" / "imagenet"))

pytestmark = pytest.mark.skipif(
    not (IMAGENET_DIR / "synsets.txt").is_file(),
    reason=f"ImageNet test data not found at {IMAGENET_DIR} (set IMAGENET_DIR to the shared imagenet folder)",
)

TENCH = "train-sample/n01440764/n01440764_tench.JPEG"
GOLDFISH = "train-sample/n01443537/n01443537_goldfish.JPEG"
CANOE_VAL = "val/ILSVRC2012_val_00000347.JPEG"  # val.txt: class 472, "canoe"
SMALL = Preprocessing(crop=32, crop_pct=0.875)  # fast loading where the crop size does not matter


@pytest.fixture(scope="module")
def imagenet_data():  # not `imagenet`: conftest's fixture of that name is the folder
    return open_imagenet(IMAGENET_DIR)


@pytest.fixture(scope="module")
def synsets():
    return read_synsets(IMAGENET_DIR / "synsets.txt")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- the shared data


def test_imagenet_root_counts(imagenet_data):
    calibration, evaluation = imagenet_data.calibration, imagenet_data.evaluation
    assert calibration.layout == "train" and evaluation.layout == "val"
    assert len(calibration) == 1000 and calibration.num_classes_present == 1000
    assert len(evaluation) == 650 and evaluation.num_classes_present == 464
    assert calibration.problems == () and evaluation.problems == ()
    assert len(imagenet_data.synsets) == 1000 and len(imagenet_data.class_names) == 1000
    assert imagenet_data.problems == ()


def test_labels_follow_synsets_order(imagenet_data, synsets):
    assert synsets[0] == ("n01440764", "tench, Tinca tinca")
    assert synsets[0].short_name == "tench"
    assert imagenet_data.class_names[472] == "canoe"
    labels = {r.path: r.label for r in imagenet_data.calibration.records + imagenet_data.evaluation.records}
    assert labels[IMAGENET_DIR / TENCH] == 0
    assert labels[IMAGENET_DIR / GOLDFISH] == 1
    assert labels[IMAGENET_DIR / CANOE_VAL] == 472
    # train layout: every image's label is its folder's line in synsets.txt
    wnids = [s.wnid for s in synsets]
    assert all(wnids[r.label] == r.path.parent.name for r in imagenet_data.calibration.records)


def test_records_are_sorted_by_path(imagenet_data):
    for scan in (imagenet_data.calibration, imagenet_data.evaluation):
        paths = [r.path for r in scan.records]
        assert paths == sorted(paths)


def test_open_imagenet_accepts_a_layout_folder_directly():
    val = open_imagenet(IMAGENET_DIR / "val")
    assert val.calibration is None and len(val.evaluation) == 650 and len(val.synsets) == 1000
    train = open_imagenet(IMAGENET_DIR / "train-sample")
    assert train.evaluation is None and len(train.calibration) == 1000
    assert scan_folder(IMAGENET_DIR / "val").layout == "val"


# ---------------------------------------------------------------------------- edge cases: layouts


def test_imagenet_root_built_by_hand_reports_problems_of_both_scans(tmp_path):
    shutil.copy(IMAGENET_DIR / "synsets.txt", tmp_path / "synsets.txt")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)  # `train/` as in a full ImageNet copy
    (tmp_path / "train" / "n99999999").mkdir()
    shutil.copy(IMAGENET_DIR / TENCH, tmp_path / "train" / "n01440764" / "t.JPEG")
    (tmp_path / "val").mkdir()
    shutil.copy(IMAGENET_DIR / CANOE_VAL, tmp_path / "val" / "c.JPEG")
    (tmp_path / "val" / "val.txt").write_text("c.JPEG 472\nc.JPEG\n")

    data = open_imagenet(tmp_path)

    assert [r.label for r in data.calibration.records] == [0]
    assert [r.label for r in data.evaluation.records] == [472]
    assert len(data.problems) == 2
    assert data.problems[0].startswith(str(tmp_path / "train" / "n99999999") + ": ")
    assert data.problems[1].startswith(str(tmp_path / "val" / "val.txt") + ": line 2: ")


def test_train_layout_skips_and_names_unknown_folders_and_non_images(tmp_path, synsets):
    wnids = [s.wnid for s in synsets]
    for relative in (TENCH, GOLDFISH):
        target = tmp_path / Path(relative).relative_to("train-sample")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGENET_DIR / relative, target)
    shutil.copy(IMAGENET_DIR / TENCH, tmp_path / "n01440764" / "second.jpg")
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    (tmp_path / "n99999999").mkdir()
    shutil.copy(IMAGENET_DIR / TENCH, tmp_path / "n99999999" / "stray.JPEG")
    (tmp_path / "README.md").write_text("top-level file")

    scan = read_train_layout(tmp_path, wnids)

    assert [(r.path.name, r.label) for r in scan.records] == [
        ("n01440764_tench.JPEG", 0),
        ("second.jpg", 0),
        ("n01443537_goldfish.JPEG", 1),
    ]
    problems = {p.path.name: p.reason for p in scan.problems}
    assert set(problems) == {"n99999999", "notes.txt", "README.md"}
    assert "not a wnid" in problems["n99999999"]
    assert "not an image file (.txt)" in problems["notes.txt"]


def test_train_layout_with_only_unknown_folders_is_an_error(tmp_path, synsets):
    (tmp_path / "cats").mkdir()
    shutil.copy(IMAGENET_DIR / TENCH, tmp_path / "cats" / "a.JPEG")
    with pytest.raises(PipelineError) as excinfo:
        read_train_layout(tmp_path, [s.wnid for s in synsets])
    message = one_line_error(excinfo)
    assert str(tmp_path) in message and "<wnid>" in message and "cats" in message


def test_val_layout_reports_bad_lines(tmp_path):
    names = sorted(p.name for p in (IMAGENET_DIR / "val").glob("*.JPEG"))[:4]
    for name in names:
        shutil.copy(IMAGENET_DIR / "val" / name, tmp_path / name)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "val.txt").write_text(
        f"{names[0]} 472\n"
        f"{names[1]} 5000\n"  # label out of range
        "ILSVRC2012_val_99999999.JPEG 3\n"  # missing file
        "this line is malformed\n"
        "\n"
        f"{names[2]} 7\n"
        f"{names[2]} 8\n"  # listed twice
    )  # names[3] is not listed at all

    scan = read_val_layout(tmp_path, num_classes=1000)

    assert [(r.path.name, r.label) for r in scan.records] == [(names[0], 472), (names[2], 7)]
    reasons = [str(p) for p in scan.problems]
    assert len(reasons) == 6, reasons
    joined = "\n".join(reasons)
    assert "line 2: class index 5000 is outside 0..999" in joined
    assert "line 3: ILSVRC2012_val_99999999.JPEG does not exist" in joined
    assert "line 4: expected '<file name> <class index>'" in joined
    assert "line 7:" in joined and "more than once" in joined
    assert f"{names[3]}: not listed in val.txt" in joined
    assert "README.txt: not an image file" in joined
    assert names[1] not in [Path(p.path).name for p in scan.problems]  # reported once, by its line


def test_val_layout_without_labels_file_is_an_error(tmp_path):
    shutil.copy(IMAGENET_DIR / CANOE_VAL, tmp_path / "a.JPEG")
    with pytest.raises(PipelineError) as excinfo:
        read_val_layout(tmp_path)
    assert "no val.txt in" in one_line_error(excinfo) and str(tmp_path) in str(excinfo.value)


@pytest.mark.parametrize("reader", ["train", "val", "unlabelled", "imagenet"])
def test_missing_and_empty_folders_are_one_line_errors(tmp_path, reader, synsets):
    read = {
        "train": lambda p: read_train_layout(p, [s.wnid for s in synsets]),
        "val": read_val_layout,
        "unlabelled": read_unlabelled_folder,
        "imagenet": open_imagenet,
    }[reader]
    missing = tmp_path / "does-not-exist"
    with pytest.raises(PipelineError) as excinfo:
        read(missing)
    assert "not found" in one_line_error(excinfo) and str(missing) in str(excinfo.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    if reader == "val":
        (empty / "val.txt").write_text("")
    with pytest.raises(PipelineError) as excinfo:
        read(empty)
    assert str(empty) in one_line_error(excinfo) and "expected" in str(excinfo.value)


def test_unlabelled_folder_is_recursive_and_unlabelled(tmp_path):
    (tmp_path / "cam1").mkdir()
    shutil.copy(IMAGENET_DIR / TENCH, tmp_path / "cam1" / "0001.jpg")
    shutil.copy(IMAGENET_DIR / GOLDFISH, tmp_path / "0002.PNG")  # wrong suffix is fine: PIL sniffs
    (tmp_path / "cam1" / "log.csv").write_text("t,frame")
    scan = read_unlabelled_folder(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in scan.records] == ["0002.PNG", "cam1/0001.jpg"]
    assert all(r.label is None for r in scan.records)
    assert [p.path.name for p in scan.problems] == ["log.csv"]
    assert scan_folder(tmp_path).layout == "unlabelled"
    assert list(scan.labels) == [-1, -1]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("n01440764 tench\nbad\n", ":2: expected '<wnid> <name>'"),
        ("n01440764 a\nn01440764 b\n", "listed twice"),
    ],
)
def test_bad_synsets_file_is_an_error(tmp_path, content, problem):
    (tmp_path / "synsets.txt").write_text(content)
    with pytest.raises(PipelineError) as excinfo:
        read_synsets(tmp_path / "synsets.txt")
    assert problem in one_line_error(excinfo)


# ---------------------------------------------------------------------------- edge cases: decoding


@pytest.fixture
def awkward_images(tmp_path):
    """Real images in every mode a camera or a download can hand us, and broken files."""
    source = IMAGENET_DIR / TENCH
    tench = Image.open(source)
    data = source.read_bytes()
    shutil.copy(source, tmp_path / "a_rgb.JPEG")
    tench.convert("CMYK").save(tmp_path / "b_cmyk.jpg")
    tench.convert("L").save(tmp_path / "c_grey.png")
    tench.convert("RGBA").save(tmp_path / "d_rgba.png")
    tench.convert("P").save(tmp_path / "e_palette.png")
    Image.fromarray(np.asarray(tench.convert("L")).astype(np.uint16) * 257).save(tmp_path / "f_grey16.png")
    (tmp_path / "g_truncated.JPEG").write_bytes(data[: len(data) // 2])
    (tmp_path / "h_text.JPEG").write_text("this is not a JPEG")
    (tmp_path / "i_empty.jpg").write_bytes(b"")
    return tmp_path


def test_load_images_converts_modes_and_skips_broken_files(awkward_images):
    records = read_unlabelled_folder(awkward_images).records
    loaded = load_images(records, SMALL)

    kept = [r.path.name for r in loaded.records]
    assert kept == ["a_rgb.JPEG", "b_cmyk.jpg", "c_grey.png", "d_rgba.png", "e_palette.png", "f_grey16.png"]
    skipped = {s.path.name: s.reason for s in loaded.skipped}
    assert set(skipped) == {"g_truncated.JPEG", "h_text.JPEG", "i_empty.jpg"}
    assert "truncated" in skipped["g_truncated.JPEG"]
    assert all("\n" not in reason for reason in skipped.values())

    assert loaded.crops.shape == (6, 32, 32, 3) and loaded.crops.dtype == np.uint8
    assert loaded.labels.dtype == np.int64 and list(loaded.labels) == [-1] * 6
    rgb, cmyk, grey, rgba, _, grey16 = loaded.crops.astype(int)
    assert np.array_equal(rgba, rgb)
    assert np.abs(cmyk - rgb).mean() < 5  # CMYK JPEG round trip: close, not exact
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.array_equal(grey16, grey)  # 16-bit scaled to 8 bits, not clipped to white
    inputs = loaded.inputs()
    assert inputs.shape == (6, 3, 32, 32) and inputs.dtype == np.float32


def test_truncated_jpeg_is_skipped_even_if_pil_was_told_to_accept_it(awkward_images, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    loaded = load_images([ImageRecord(awkward_images / "g_truncated.JPEG", 3)], SMALL)
    assert len(loaded) == 0 and loaded.crops.shape == (0, 32, 32, 3)
    assert "truncated" in loaded.skipped[0].reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_iter_batches_yields_full_batches_and_names_skipped_files(awkward_images):
    records = read_unlabelled_folder(awkward_images).records
    calls = []
    batches = list(iter_batches(records, SMALL, batch_size=4, progress=lambda *a: calls.append(a)))
    assert calls == [(done, 9) for done in range(1, 10)]  # every file counts, skipped ones too
    assert [len(b) for b in batches] == [4, 2]
    assert sum(len(b.skipped) for b in batches) == 3
    whole = load_images(records, SMALL)
    assert np.array_equal(np.concatenate([b.crops for b in batches]), whole.crops)
    with pytest.raises(ValueError):
        next(iter_batches(records, SMALL, batch_size=0))


def test_real_images_load_with_labels(imagenet_data):
    records = select_balanced(imagenet_data.evaluation.records, 8, seed=0)
    loaded = load_images(records, Preprocessing(crop=299, crop_pct=0.875))
    assert loaded.skipped == () and loaded.crops.shape == (8, 299, 299, 3)
    assert list(loaded.labels) == [r.label for r in records]


# ---------------------------------------------------------------------------- sampling


def test_selection_is_deterministic_and_independent_of_listing_order(imagenet_data):
    records = list(imagenet_data.evaluation.records)
    first = select_balanced(records, 64, seed=7)
    random.Random(1).shuffle(records)
    assert select_balanced(records, 64, seed=7) == first
    assert select_balanced(tuple(reversed(records)), 64, seed=7) == first


def test_selection_spreads_over_classes(imagenet_data):
    val = imagenet_data.evaluation.records
    assert len({r.label for r in select_balanced(val, 64, seed=0)}) == 64
    # more than one per class: no class gets a second image before every class has one
    counts = Counter(r.label for r in select_balanced(val, 500, seed=0))
    assert len(counts) == 464 and max(counts.values()) == 2
    train = select_balanced(imagenet_data.calibration.records, 1000, seed=0)
    assert len({r.label for r in train}) == 1000


def test_selection_prefix_and_seeds(imagenet_data):
    val = imagenet_data.evaluation.records
    assert select_balanced(val, 128, seed=3)[:64] == select_balanced(val, 64, seed=3)
    assert select_balanced(val, 64, seed=3) != select_balanced(val, 64, seed=4)
    assert set(select_balanced(val, 64, seed=3)) != set(select_balanced(val, 64, seed=4))
    assert select_balanced(val, 0, seed=3) == []


def test_too_few_images(imagenet_data):
    val = imagenet_data.evaluation.records
    everything = select_balanced(val, 10_000, seed=0)
    assert len(everything) == 650 and set(everything) == set(val)
    require_at_least(everything, 650, "evaluation images")
    with pytest.raises(PipelineError) as excinfo:
        require_at_least(everything, 651, "evaluation images")
    message = one_line_error(excinfo)
    assert "too few evaluation images: 650" in message and "651" in message
    assert str(IMAGENET_DIR / "val") in message


def test_unlabelled_selection_is_a_seeded_sample(imagenet_data):
    unlabelled = [ImageRecord(r.path, None) for r in imagenet_data.calibration.records]
    sample = select_balanced(unlabelled, 50, seed=1)
    assert len(set(sample)) == 50 and sample == select_balanced(list(reversed(unlabelled)), 50, seed=1)
    assert sample != select_balanced(unlabelled, 50, seed=2)


def test_selection_does_not_depend_on_where_the_dataset_lives(tmp_path):
    names = sorted(p.name for p in (IMAGENET_DIR / "val").glob("*.JPEG"))[:12]
    for folder in ("one", "two/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(IMAGENET_DIR / "val" / name, tmp_path / folder / name)
    pick = [
        [r.path.name for r in select_balanced(read_unlabelled_folder(tmp_path / f).records, 5, seed=9)]
        for f in ("one", "two/deeper")
    ]
    assert pick[0] == pick[1]


def test_calibration_and_evaluation_are_disjoint(imagenet_data, tmp_path):
    calibration, evaluation = imagenet_data.calibration.records, imagenet_data.evaluation.records
    assert_disjoint(calibration, evaluation)

    with pytest.raises(PipelineError) as excinfo:
        assert_disjoint(calibration, evaluation + (calibration[5],))
    assert str(calibration[5].path) in one_line_error(excinfo)

    copy = tmp_path / "renamed.JPEG"
    shutil.copy(IMAGENET_DIR / TENCH, copy)
    with pytest.raises(PipelineError) as excinfo:
        assert_disjoint(calibration, evaluation + (ImageRecord(copy, 0),))
    message = one_line_error(excinfo)
    assert str(copy) in message and str(IMAGENET_DIR / TENCH) in message


# ---------------------------------------------------------------------------- digests


def test_records_digest_is_a_content_key(imagenet_data, tmp_path):
    records = list(select_balanced(imagenet_data.evaluation.records, 6, seed=0))
    digest = records_digest(records)
    assert len(digest) == 64 and records_digest(records) == digest

    # the same images elsewhere (another machine, another checkout): same key
    moved = []
    for record in records:
        shutil.copy(record.path, tmp_path / record.path.name)
        moved.append(ImageRecord(tmp_path / record.path.name, record.label))
    assert records_digest(moved) == digest

    assert records_digest([ImageRecord(moved[0].path, moved[0].label + 1)] + moved[1:]) != digest
    assert records_digest(moved[::-1]) != digest  # calibration consumes images in order
    assert records_digest(moved[:-1]) != digest
    shutil.copy(IMAGENET_DIR / TENCH, moved[2].path)  # an image replaced in place
    assert records_digest(moved) != digest
