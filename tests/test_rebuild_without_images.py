"""A fully cached rebuild needs no images (the digests the last build recorded stand in for them); a stage that
must be built still needs them and says where it looked; a build that fails first leaves no empty folders."""

from __future__ import annotations

import json
import shutil

from pipeline.cli import main
from pipeline.layout import IMAGE_DIGESTS
from tests.builds import MODEL


def _copy(small_cpu_build, tmp_path):
    shutil.copytree(small_cpu_build.work / "build", tmp_path / "build")
    shutil.copy(small_cpu_build.work / "small.yaml", tmp_path / "small.yaml")
    return tmp_path / "build"


def _args(build_dir, imagenet, *extra):
    return ["build", "--model", MODEL, "--target", "cpu", "--imagenet", str(imagenet), "--build-dir", str(build_dir),
            "--config", str(build_dir.parent / "small.yaml"), "--no-report", *extra]


def test_a_fully_cached_rebuild_runs_without_its_images(small_cpu_build, tmp_path, capsys):
    build_dir = _copy(small_cpu_build, tmp_path)
    root = build_dir / MODEL / "cpu"
    recorded = json.loads((root / IMAGE_DIGESTS).read_text())
    assert set(recorded["digests"]) == {"evaluation", "calibration", "decision"}
    before = json.loads((root / "manifest.json").read_text())
    capsys.readouterr()
    assert main(_args(build_dir, tmp_path / "no-imagenet-here")) == 0
    err = capsys.readouterr().err
    assert "no-imagenet-here" in err and "using the image digests recorded when" in err
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["built_this_run"] == []
    assert {name: stage["key"] for name, stage in manifest["stages"].items()} == \
        {name: stage["key"] for name, stage in before["stages"].items()}


def test_a_stage_that_must_be_built_still_needs_the_images(small_cpu_build, tmp_path, capsys):
    build_dir = _copy(small_cpu_build, tmp_path)
    (tmp_path / "small.yaml").write_text((tmp_path / "small.yaml").read_text().replace(
        "quantization:\n", "quantization:\n  percentile: 99.9\n"))  # the calibration table must be rebuilt
    capsys.readouterr()
    assert main(_args(build_dir, tmp_path / "no-imagenet-here")) == 2
    err = capsys.readouterr().err
    assert "--imagenet / IMAGENET_DIR" in err and "no-imagenet-here" in err
    assert (build_dir / MODEL / "cpu" / "calibrate" / "stage.json").is_file()  # the old build is untouched


def test_another_selection_does_not_reuse_recorded_digests(small_cpu_build, tmp_path, capsys):
    build_dir = _copy(small_cpu_build, tmp_path)
    (tmp_path / "small.yaml").write_text((tmp_path / "small.yaml").read_text().replace("data:\n", "data:\n  seed: 1\n"))
    capsys.readouterr()
    assert main(_args(build_dir, tmp_path / "no-imagenet-here")) == 2
    assert "--imagenet / IMAGENET_DIR" in capsys.readouterr().err


def test_a_build_that_fails_first_leaves_no_empty_folders(tmp_path, capsys):
    build_dir = tmp_path / "build"
    (tmp_path / "small.yaml").write_text("")
    assert main(_args(build_dir, tmp_path / "no-imagenet-here")) == 2
    assert "--imagenet / IMAGENET_DIR" in capsys.readouterr().err
    assert not (build_dir / MODEL).exists()
    assert [path.name for path in build_dir.iterdir()] == [".locks"]  # the lock outlives the folders it guards
