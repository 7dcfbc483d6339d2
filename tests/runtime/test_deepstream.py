"""`python -m pipeline deepstream DIR`: the nvinfer configuration read back with configparser and checked
against the bundle manifest it was written from."""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import pytest

from pipeline.artifact import Bundle
from pipeline.cli import main
from tests.runtime.test_runtime import shared_build

# End-to-end runs over their own Lite0 builds: the full suite, not the fast tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build(tmp_path_factory, imagenet) -> Path:
    return shared_build(tmp_path_factory, imagenet, "desktop-gpu")


@pytest.fixture
def bundle(build, tmp_path) -> Path:
    """A copy of the ONNX bundle (the test may change its manifest)."""
    copy = tmp_path / "bundle"
    shutil.copytree(build / "bundle", copy)
    return copy


def _read(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.read(path)
    return parser["property"]


def test_config_values_follow_the_manifest(bundle, capsys):
    assert main(["deepstream", str(bundle), "--batch-size", "4"]) == 0
    assert "deepstream_nvinfer.txt" in capsys.readouterr().out
    manifest = Bundle.open(bundle).manifest
    prop = _read(bundle / "deepstream_nvinfer.txt")
    mean, std = manifest["preprocessing"]["mean"], manifest["preprocessing"]["std"]
    # nvinfer: y = net-scale-factor * (x - offset) must equal (x / 255 - mean) / std for every pixel value.
    scale = float(prop["net-scale-factor"])
    offsets = [float(o) for o in prop["offsets"].split(";")]
    assert len(offsets) == 3
    for x in (0.0, 77.0, 255.0):
        for channel in range(3):
            assert abs(scale * (x - offsets[channel]) - (x / 255.0 - mean[channel]) / std[channel]) < 1e-6
    assert prop["model-color-format"] == "0"  # RGB
    assert prop["network-mode"] == {"fp32": "0", "int8": "1", "fp16": "2"}[manifest["precision"]]
    assert prop["onnx-file"] == manifest["artifacts"][manifest["precision"]]["file"]
    assert (bundle / prop["onnx-file"]).is_file()
    size = manifest["input"]["size"]
    assert prop["infer-dims"] == f"3;{size};{size}"
    assert prop["batch-size"] == "4"
    assert prop["network-type"] == "1" and prop["process-mode"] == "1"
    assert prop["output-blob-names"] == manifest["output"]["name"]
    assert "gie-unique-id" in prop and "classifier-threshold" in prop
    # Classifier label file: the class names of the one output layer on one line, separated by semicolons.
    labels = (bundle / prop["labelfile-path"]).read_text().splitlines()
    assert len(labels) == 1
    assert labels[0].split(";") == [name.replace(";", ",") for name in Bundle.open(bundle).labels()]


def test_an_engine_this_machine_cannot_run_is_left_out(bundle, tmp_path):
    """An engine under engines/ but no TensorRT here: no usable engine, the key is left out with the reason."""
    engine = bundle / "engines" / "int8-orin-trt10.3.0" / "model.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"engine")
    output = tmp_path / "configs" / "classifier.txt"
    assert main(["deepstream", str(bundle), "--output", str(output)]) == 0
    prop = _read(output)
    assert "model-engine-file" not in prop
    assert "# model-engine-file" in output.read_text()
    # Paths are relative to the configuration file, as nvinfer resolves them.
    assert (output.parent / prop["onnx-file"]).resolve() == (bundle / "models" / "int8_qdq.onnx").resolve()
    assert (output.parent / prop["labelfile-path"]).is_file()


def _edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_per_channel_std_is_refused(bundle, capsys):
    _edit_manifest(bundle, lambda m: m["preprocessing"].update(std=[0.229, 0.224, 0.225]))
    assert main(["deepstream", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "differs across channels" in err and len(err.strip().splitlines()) == 1
    assert not (bundle / "deepstream_nvinfer.txt").exists()


def test_fp32_precision_and_a_cpu_bundle(bundle, tmp_path_factory, imagenet, capsys):
    _edit_manifest(bundle, lambda m: m.update(precision="fp32"))
    assert main(["deepstream", str(bundle)]) == 0
    prop = _read(bundle / "deepstream_nvinfer.txt")
    assert prop["network-mode"] == "0" and prop["onnx-file"] == "models/fp32.onnx"
    cpu_bundle = shared_build(tmp_path_factory, imagenet, "cpu") / "bundle"
    assert main(["deepstream", str(cpu_bundle)]) == 2
    assert "no ONNX model for DeepStream" in capsys.readouterr().err


def test_batch_size_beyond_the_profile_is_refused(bundle, capsys):
    assert main(["deepstream", str(bundle), "--batch-size", "64"]) == 2
    assert "max batch" in capsys.readouterr().err
