"""NNCF's own quantizer on real weights (EfficientNet-Lite0) and real ImageNet images.

The design notes: plain `nncf.quantize` (300 images) keeps Lite0's top-1 within half a point with
97-98% agreement; with 32 calibration images we require at least 90% top-1 agreement with FP32 on
64 held-out val images (the measured value is printed: run with -s to see it).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

pytest.importorskip("nncf", reason="NNCF is not installed (pip install nncf, the project's `nncf` extra)")
pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from pipeline.errors import PipelineError  # noqa: E402
from targets.onnxruntime import OnnxRuntimeRunner
from targets.runner import predict  # noqa: E402
from targets.nncf_quantizer import calibration_samples, count_fake_quantize, nncf_quantize_ir  # noqa: E402
from targets.openvino import OpenVinoRunner, convert_to_ir  # noqa: E402
from tests.targets.test_runner import export_onnx, random_images, small_net  # noqa: E402

CALIBRATION_IMAGES = 32
EVALUATION_IMAGES = 64
MIN_AGREEMENT = 0.90


def constant_types(xml_path) -> set[str]:
    text = xml_path.read_text()
    layers = re.findall(r'<layer [^>]*type="Const".*?</layer>', text, flags=re.S)
    return {t for layer in layers for t in re.findall(r'element_type="(\w+)"', layer)}


@pytest.fixture(scope="module")
def lite0(imagenet, tmp_path_factory):
    """EfficientNet-Lite0 (published weights) as FP32 ONNX and IR, with calibration and val images."""
    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.sampling import assert_disjoint, select_balanced
    from pipeline.models import get_spec
    from pipeline.weights import load_model

    try:
        model = load_model("efficientnet_lite0", "imagenet")
    except PipelineError as error:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {error}")
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    folder = tmp_path_factory.mktemp("nncf-lite0")
    onnx_path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(model.module, torch.zeros(1, 3, 224, 224), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    data = open_imagenet(imagenet)
    calibration = select_balanced(data.calibration.records, CALIBRATION_IMAGES, seed=0)
    evaluation = select_balanced(data.evaluation.records, EVALUATION_IMAGES, seed=0)
    assert_disjoint(calibration, evaluation)
    calibration_images = load_images(calibration, preprocessing)
    evaluation_images = load_images(evaluation, preprocessing)
    assert len(calibration_images) == CALIBRATION_IMAGES and len(evaluation_images) == EVALUATION_IMAGES
    return {
        "onnx": onnx_path,
        "ir_fp32": convert_to_ir(onnx_path, folder / "fp32" / "model.xml", "fp32"),
        "folder": folder,
        "calibration": preprocessing.normalize(calibration_images.crops),
        "evaluation": preprocessing.normalize(evaluation_images.crops),
        "labels": evaluation_images.labels,
    }


def test_nncf_int8_lite0_agrees_with_fp32(lite0):
    int8_xml = nncf_quantize_ir(lite0["ir_fp32"], lite0["calibration"], CALIBRATION_IMAGES,
                                lite0["folder"] / "int8" / "model.xml")
    assert int8_xml.is_file() and int8_xml.with_suffix(".bin").is_file()
    assert count_fake_quantize(int8_xml) > 50  # every conv's input and weights are quantized
    assert "f16" not in constant_types(int8_xml)  # compress_to_fp16=False held

    reference = predict(OnnxRuntimeRunner(lite0["onnx"]), lite0["evaluation"], batch_size=16)
    # f32 pinned for the float layers: the comparison measures quantization, not bf16.
    quantized = predict(OpenVinoRunner(int8_xml, inference_precision="f32"), lite0["evaluation"], batch_size=16)
    agreement = float(np.mean(reference.argmax(1) == quantized.argmax(1)))
    top1_fp32 = float(np.mean(reference.argmax(1) == lite0["labels"]))
    top1_int8 = float(np.mean(quantized.argmax(1) == lite0["labels"]))
    print(f"\nNNCF INT8 (32 calibration images) vs FP32 on {EVALUATION_IMAGES} val images: "
          f"agreement {agreement:.1%}, top-1 FP32 {top1_fp32:.1%}, INT8 {top1_int8:.1%}")
    assert top1_fp32 >= 0.70  # the real weights and preprocessing are in place (about 85% on this val set)
    assert agreement >= MIN_AGREEMENT, f"agreement {agreement:.1%} < {MIN_AGREEMENT:.0%}"


def test_nncf_from_onnx_and_from_batches(tmp_path):
    onnx_path = export_onnx(small_net(), tmp_path / "small.onnx")
    images = random_images(12)
    batches = [images[:5], images[5:]]
    assert len(calibration_samples(batches)) == 12 and calibration_samples(images)[0].shape == (1, 3, 32, 32)
    xml = nncf_quantize_ir(onnx_path, batches, 12, tmp_path / "int8" / "model.xml", preset="mixed")
    assert count_fake_quantize(xml) > 0
    reference = OnnxRuntimeRunner(onnx_path).run({"input": images})["logits"]
    quantized = OpenVinoRunner(xml, inference_precision="f32").run({"input": images})["logits"]
    cosine = float(np.sum(reference * quantized) / np.linalg.norm(reference) / np.linalg.norm(quantized))
    assert cosine > 0.99


def test_nncf_refuses_what_it_would_silently_change(tmp_path):
    onnx_path = export_onnx(small_net(), tmp_path / "small.onnx")
    images = random_images(8)
    with pytest.raises(PipelineError, match="subset_size 300 asks for more calibration images than the 8 given"):
        nncf_quantize_ir(onnx_path, images, 300, tmp_path / "out.xml")
    with pytest.raises(PipelineError, match="preset"):
        nncf_quantize_ir(onnx_path, images, 8, tmp_path / "out.xml", preset="accuracy")
    with pytest.raises(PipelineError, match="not found"):
        nncf_quantize_ir(tmp_path / "missing.xml", images, 8, tmp_path / "out.xml")
    with pytest.raises(PipelineError, match=r"\(N, C, H, W\)"):
        nncf_quantize_ir(onnx_path, images[0], 1, tmp_path / "out.xml")
