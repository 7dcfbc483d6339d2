"""The CPU target's self-verifying bundle, from a real INT8 EfficientNet-Lite0 build (genuine ImageNet weights).

The session's small CPU build (tests/builds.py: 64 calibration images, 96 INT8 evaluation images, 40 golden
images) is shared by every test; the stage-list tests need no build.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifact import Bundle, sha256_file
from pipeline.cli import main
from pipeline.config import load_config
from tests.builds import MODEL, SmallBuild

# Every manifest key `pipeline.artifact.Bundle` documents.
MANIFEST_KEYS = {"format", "pipeline_version", "model", "target", "precision", "random_weights", "labelled", "input",
                 "output", "preprocessing", "labels", "golden", "artifacts", "budgets", "expected", "tolerance",
                 "trtexec", "wheel", "host", "files"}


def check_manifest_files(bundle_dir: Path) -> dict:
    """Every file of the bundle is listed with its sha256, and every listed file exists; returns the manifest."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    on_disk = {str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file()}
    # The marker, the cache's record, and the hash cache an earlier Bundle.open may have left.
    assert on_disk - set(manifest["files"]) - {".verified.json"} == {"manifest.json", "stage.json"}
    assert manifest["sizes"] == {relative: (bundle_dir / relative).stat().st_size for relative in manifest["files"]}
    for relative, digest in manifest["files"].items():
        assert sha256_file(bundle_dir / relative) == digest, relative
    return manifest


def wheel_installs_without_torch(wheel: Path, venv: Path) -> None:
    """A fresh venv (no torch), the wheel with its dependencies, then `device-build --help` runs."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    if install.returncode != 0 and "Could not find a version" in install.stderr + install.stdout:
        pytest.skip(f"the wheel's dependencies cannot be fetched from the package index here: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr
    outside = {**os.environ, "PYTHONPATH": ""}
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, cwd=venv, env=outside)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    helped = subprocess.run([str(python), "-m", "pipeline", "device-build", "--help"], capture_output=True, text=True,
                            cwd=venv, env=outside)
    assert helped.returncode == 0, helped.stderr
    assert "BUNDLE" in helped.stdout
    where = subprocess.run([str(python), "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, cwd=venv, env=outside)
    assert str(venv) in where.stdout  # the wheel's copy, not the source tree


def _stage_names(**overrides) -> list[str]:
    from pipeline.stages import stages_for

    return [stage.name for stage in stages_for(load_config(overrides=overrides))]


def test_stage_lists_per_target():
    cpu = ["reference", "export", "simplify", "openvino_fp32", "openvino_fp16"]
    assert _stage_names(target="cpu", precision="fp32") == cpu + ["bundle"]
    assert _stage_names(target="cpu", precision="int8") == cpu + ["calibrate", "quantize", "openvino_int8", "bundle"]
    gpu = ["reference", "export", "simplify", "fp16"]
    for target in ("jetson", "desktop-gpu"):
        assert _stage_names(target=target, precision="int8") == gpu + ["calibrate", "quantize", "quantize_fp16", "bundle"]
        assert _stage_names(target=target, precision="fp16") == gpu + ["bundle"]
        assert _stage_names(target=target, precision="fp32") == gpu + ["bundle"]


def test_bundle_inputs_and_deployed_stage():
    from pipeline.stages import deployed_stage, stages_for

    config = load_config(overrides={"target": "cpu", "precision": "int8"})
    assert stages_for(config)[-1].inputs == ("reference", "openvino_int8", "calibrate", "quantize")
    assert deployed_stage(config) == "openvino_int8"
    gpu = load_config(overrides={"target": "jetson", "precision": "int8"})
    assert stages_for(gpu)[-1].inputs == ("reference", "simplify", "fp16", "calibrate", "quantize", "quantize_fp16")
    assert deployed_stage(gpu) == "bundle"


def test_bundle_key_covers_its_options_and_the_project_source():
    from pipeline.stages.bundle import project_source_digest
    from pipeline.stages import stages_for

    def params(**overrides):
        return stages_for(load_config(overrides={"target": "cpu", "precision": "fp32", **overrides}))[-1].params

    assert params()["project_source"] == project_source_digest() != "installed"
    assert params(bundle={"golden_images": 8}) != params()
    assert params(bundle={"include_wheel": False}) != params()
    # The FP32 IR always runs pinned to f32; the INT8 IR in the deployed precision, which the bundle records.
    assert params(openvino={"inference_precision": "f32"}) == params()
    assert params(precision="int8", openvino={"inference_precision": "f32"}) != params(precision="int8")
    assert params(drift={"openvino_fp32": {"min_agreement": 0.5}}) != params()


@pytest.fixture(scope="module")
def cpu_build(small_cpu_build) -> SmallBuild:
    return small_cpu_build


def test_cpu_bundle_lists_every_file_with_its_hash(cpu_build):
    root = cpu_build.root
    manifest = check_manifest_files(root / "bundle")
    bundle = Bundle.open(root / "bundle")
    assert bundle.target == "cpu" and bundle.precision == "int8" and bundle.model == MODEL
    assert set(manifest["artifacts"]) == {"int8"}
    artifact = bundle.artifact()
    assert artifact["kind"] == "openvino" and artifact["file"] == "models/model.xml"
    # The deployed IR, byte for byte.
    assert sha256_file(bundle.path("models/model.xml")) == sha256_file(root / "openvino_int8" / "model.xml")
    assert sha256_file(bundle.path("models/model.bin")) == sha256_file(root / "openvino_int8" / "model.bin")
    assert manifest["golden"]["intermediates"] is None and manifest["trtexec"] == []
    assert manifest["wheel"].startswith("wheel/") and manifest["wheel"].endswith(".whl")
    assert (root / "bundle" / "README.md").read_text().count("python -m pipeline verify .") == 1
    build_manifest = json.loads((root / "manifest.json").read_text())
    assert build_manifest["deployed"]["artifact"] == "openvino_int8/model.xml"
    assert "bundle" in build_manifest["stages"] and "deferred" not in build_manifest


def test_cpu_golden_data_is_the_reference_prefix(cpu_build):
    root = cpu_build.root
    bundle = Bundle.open(root / "bundle")
    crops, labels, reference = bundle.golden()
    assert crops.dtype == np.uint8 and crops.shape == (40, 224, 224, 3)
    assert labels.dtype == np.int64 and (labels >= 0).all()
    np.testing.assert_array_equal(reference, np.load(root / "reference" / "logits.npy")[:40])
    np.testing.assert_array_equal(labels, np.load(root / "reference" / "labels.npy")[:40])
    assert bundle.labels() == (root / "labels.txt").read_text().splitlines()
    expected = bundle.manifest["expected"]["int8"]
    assert expected["images"] == 40 and expected["host_proxy"] is False and "openvino" in expected["source"]
    assert expected["ref_top1"] > 60.0 and expected["agreement"] >= 0.9  # genuine weights, right preprocessing
    assert bundle.manifest["budgets"]["int8"] == {"max_top1_drop": 3.0}  # openvino_int8's, from small.yaml


def test_cpu_golden_outputs_reproduce_in_openvino(cpu_build):
    from targets.openvino import OpenVinoRunner
    from targets.runner import predict

    root = cpu_build.root
    bundle = Bundle.open(root / "bundle")
    crops, _, reference = bundle.golden()
    hint = bundle.artifact()["inference_precision"]
    runner = OpenVinoRunner(bundle.path("models/model.xml"), inference_precision=None if hint == "auto" else hint)
    logits = predict(runner, crops, 8, prepare=bundle.normalize)
    tolerance = bundle.manifest["tolerance"]["int8"]["max_abs"]
    assert np.max(np.abs(logits - reference)) <= tolerance
    assert 0.0 < tolerance < 10.0  # INT8 logits differ from FP32 but stay close


def test_cpu_calibration_table_is_the_build_table(cpu_build):
    root = cpu_build.root
    table = json.loads((root / "bundle" / "calibration.json").read_text())
    assert table == json.loads((root / "calibrate" / "calibration.json").read_text())
    assert table["format"] == "inception-edge-calibration/1" and table["tensors"]


def test_archive_opens_anywhere(cpu_build, tmp_path):
    root = cpu_build.root
    archive = root / "bundle.tar.gz"
    assert archive.is_file() and not list(root.glob(".bundle.tar.gz.*"))
    copy = tmp_path / "device" / "bundle.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    bundle = Bundle.open(copy)
    assert bundle.root == tmp_path / "device" / "bundle"
    assert not (bundle.root / "stage.json").exists()  # the cache's marker stays on the host
    assert bundle.manifest == json.loads((root / "bundle" / "manifest.json").read_text())


def rerun_rebuilds_nothing(build: SmallBuild) -> None:
    """A rerun rebuilds nothing and leaves the archive alone. Other work in this checkout may edit the
    project's source meanwhile (the bundled wheel: part of the bundle's key): then the bundle, and only
    the bundle, is rebuilt, for that reason only."""
    root = build.root
    archive = root / "bundle.tar.gz"
    old = json.loads((root / "bundle" / "stage.json").read_text())
    before = archive.stat().st_mtime_ns
    assert main(build.args()) == 0
    built = json.loads((root / "manifest.json").read_text())["built_this_run"]
    new = json.loads((root / "bundle" / "stage.json").read_text())
    if built == []:
        assert new == old and archive.stat().st_mtime_ns == before  # rewritten only when the bundle changed
        return
    assert built == ["bundle"] and archive.stat().st_mtime_ns > before
    assert new["params"]["project_source"] != old["params"]["project_source"]
    assert {**new["params"], "project_source": ""} == {**old["params"], "project_source": ""}
    assert new["inputs"] == old["inputs"] and new["tools"] == old["tools"]


def test_cached_rerun_rebuilds_nothing(cpu_build):
    rerun_rebuilds_nothing(cpu_build)


def test_archive_is_rewritten_when_the_bundle_is_newer(cpu_build):
    archive = cpu_build.root / "bundle.tar.gz"
    os.utime(archive, ns=(0, 0))  # older than the bundle: as after a build killed before the archive
    assert main(cpu_build.args()) == 0
    assert archive.stat().st_mtime_ns > 0
    Bundle.open(archive, check_hashes=True)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_without_torch(cpu_build, tmp_path):
    root = cpu_build.root
    bundle = Bundle.open(root / "bundle")
    wheel_installs_without_torch(bundle.path(bundle.manifest["wheel"]), tmp_path / "venv")


def test_no_wheel_when_turned_off(tmp_path, imagenet):
    """FP32 build with bundle.include_wheel off: the manifest says so and the bundle still opens."""
    (tmp_path / "small.yaml").write_text("data:\n  evaluation_images: 16\nbundle:\n  golden_images: 8\n  include_wheel: false\n")
    assert main(SmallBuild(tmp_path, imagenet, "cpu").args("--precision", "fp32")) == 0
    bundle = Bundle.open(tmp_path / "build" / MODEL / "cpu" / "bundle")
    assert bundle.manifest["wheel"] is None and "include_wheel" in bundle.manifest["wheel_note"]
    assert bundle.artifact("fp32")["inference_precision"] == "f32"
    assert bundle.manifest["budgets"]["fp32"]["min_agreement"] == 1.0  # openvino_fp32's budget
    assert bundle.manifest["golden"]["images"] == 8 and not bundle.path("wheel").exists()
