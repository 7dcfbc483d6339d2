"""Damaged inputs are counted where people look: a tiny build on an ImageNet copy with one file of each kind
of damage lists every skipped file, with its reason and the counts, in manifest.json and the report, and
a cached rerun (which decodes nothing) still does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.faults import build_args, manifest, root_of

GOOD = 8
EXPECTED = {"truncated": 1, "unreadable": 1, "label out of range": 1, "unknown class folder": 1,
            "missing from val.txt": 1}


@pytest.fixture()
def damaged_imagenet(imagenet, tmp_path) -> Path:
    root = tmp_path / "imagenet"
    (root / "train-sample").mkdir(parents=True)
    (root / "val").mkdir()
    shutil.copy(imagenet / "synsets.txt", root)
    wnids = sorted(p.name for p in (imagenet / "train-sample").iterdir())[:4]
    for wnid in wnids:
        (root / "train-sample" / wnid).symlink_to(imagenet / "train-sample" / wnid)
    stray = root / "train-sample" / "n99999999"  # a class folder that is not in synsets.txt
    stray.mkdir()
    shutil.copy(next((imagenet / "train-sample" / wnids[0]).iterdir()), stray / "stray.JPEG")

    lines = (imagenet / "val" / "val.txt").read_text().splitlines()[: GOOD + 2]
    for line in lines:
        shutil.copy(imagenet / "val" / line.split()[0], root / "val")
    good, (out_of_range, unlisted) = lines[:GOOD], lines[GOOD:]
    truncated = root / "val" / "truncated.JPEG"
    data = (imagenet / "val" / good[0].split()[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    (root / "val" / "unreadable.JPEG").write_text("not a JPEG at all")
    listed = [*good, "truncated.JPEG 0", "unreadable.JPEG 1", f"{out_of_range.split()[0]} 5000"]
    (root / "val" / "val.txt").write_text("\n".join(listed) + "\n")
    assert (root / "val" / unlisted.split()[0]).is_file()  # present, but val.txt does not name it
    return root


def _check(skipped: dict) -> None:
    assert skipped["by_reason"] == EXPECTED
    assert skipped["count"] == len(skipped["files"]) == sum(EXPECTED.values())
    by_kind = {row["kind"]: row for row in skipped["files"]}
    assert by_kind["truncated"]["path"].endswith("truncated.JPEG") and by_kind["truncated"]["images"] == "evaluation"
    assert by_kind["unreadable"]["path"].endswith("unreadable.JPEG")
    assert "5000" in by_kind["label out of range"]["reason"]
    assert by_kind["unknown class folder"]["path"].endswith("n99999999")


def test_skipped_images_are_counted_in_the_manifest_and_the_report(damaged_imagenet, tmp_path, capsys):
    args = build_args(tmp_path, damaged_imagenet, "--eval-images", str(GOOD + 2))
    assert main(args) == 0
    first = manifest(tmp_path)
    _check(first["skipped_images"])
    assert first["evaluation_images"] == GOOD
    assert "truncated.JPEG" in capsys.readouterr().err  # still warned on the console too

    assert main(args) == 0  # cached: nothing is decoded again
    again = manifest(tmp_path)
    assert again["built_this_run"] == []
    assert again["skipped_images"] == first["skipped_images"]

    root = root_of(tmp_path)
    assert main(["report", str(root), "--latency-seconds", "0"]) == 0
    _check(json.loads((root / "report" / "report.json").read_text())["skipped_images"])
    markdown = (root / "report" / "report.md").read_text()
    assert "Skipped images" in markdown and "truncated 1" in markdown and "unreadable.JPEG" in markdown
