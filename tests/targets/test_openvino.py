"""OpenVINO IR conversion and runner on a small real conv net: precisions written and run."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("torch")

from pipeline.errors import PipelineError  # noqa: E402
from targets.onnxruntime import OnnxRuntimeRunner
from targets.runner import predict  # noqa: E402
from targets.openvino import (  # noqa: E402
    OpenVinoRunner,
    convert_to_ir,
    cpu_capabilities,
    openvino_version,
)
from tests.targets.test_runner import export_onnx, max_rel_error, random_images, small_net  # noqa: E402

needs_bf16 = pytest.mark.skipif("BF16" not in cpu_capabilities(), reason="CPU has no bf16 support")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The ONNX file and its FP32 and FP16 IRs."""
    folder = tmp_path_factory.mktemp("openvino")
    onnx_path = export_onnx(small_net(), folder / "small.onnx")
    return {
        "onnx": onnx_path,
        "fp32": convert_to_ir(onnx_path, folder / "fp32" / "model.xml", "fp32"),
        "fp16": convert_to_ir(onnx_path, folder / "fp16" / "model.xml", "fp16"),
    }


@pytest.fixture(scope="module")
def onnxruntime_logits(models):
    return OnnxRuntimeRunner(models["onnx"]).run({"input": random_images(8)})["logits"]


def element_types_of_constants(xml_path) -> set[str]:
    text = xml_path.read_text()
    layers = re.findall(r'<layer [^>]*type="Const".*?</layer>', text, flags=re.S)
    return {t for layer in layers for t in re.findall(r'element_type="(\w+)"', layer)}


def test_ir_precision_of_stored_weights(models):
    fp32, fp16 = models["fp32"], models["fp16"]
    assert fp32.with_suffix(".bin").is_file() and fp16.with_suffix(".bin").is_file()
    assert "f16" not in element_types_of_constants(fp32)  # compress_to_fp16=False really held
    assert "f16" in element_types_of_constants(fp16)
    ratio = fp16.with_suffix(".bin").stat().st_size / fp32.with_suffix(".bin").stat().st_size
    assert 0.45 < ratio < 0.55


def test_pinned_f32_matches_onnxruntime(models, onnxruntime_logits):
    runner = OpenVinoRunner(models["fp32"], inference_precision="f32", threads=1)
    assert runner.execution_precision == "f32"
    assert runner.name == "openvino f32"
    assert (runner.input_name, runner.output_name) == ("input", "logits")
    logits = runner.run({"input": random_images(8)})["logits"]
    assert logits.dtype == np.float32
    assert max_rel_error(logits, onnxruntime_logits) < 1e-5


def test_fp16_ir_runs_close_to_fp32(models, onnxruntime_logits):
    runner = OpenVinoRunner(models["fp16"], inference_precision="f32")
    logits = runner.run({"input": random_images(8)})["logits"]
    assert 0 < max_rel_error(logits, onnxruntime_logits) < 1e-2


@needs_bf16
def test_default_precision_is_bf16_on_this_cpu(models, onnxruntime_logits):
    runner = OpenVinoRunner(models["fp32"])
    assert runner.execution_precision == "bf16"
    assert runner.name == "openvino bf16"
    logits = runner.run({"input": random_images(8)})["logits"]
    # bf16 keeps 8 mantissa bits: visibly different, still close.
    assert 1e-4 < max_rel_error(logits, onnxruntime_logits) < 0.1


@pytest.mark.skipif("FP16" in cpu_capabilities(), reason="CPU computes in f16")
def test_unsupported_precision_is_refused_not_downgraded(models):
    with pytest.raises(PipelineError, match="cannot run model.xml in f16"):
        OpenVinoRunner(models["fp32"], inference_precision="f16")


def test_batches_of_any_size_match_one_shot(models):
    runner = OpenVinoRunner(models["fp32"], inference_precision="f32")
    images = random_images(7)
    one_shot = runner.run({"input": images})["logits"]
    batched = predict(runner, images, batch_size=3)
    np.testing.assert_allclose(batched, one_shot, rtol=1e-5, atol=1e-6)
    # The reused request must not hand back a buffer that the next batch overwrites.
    first = runner.run({"input": images[:2]})["logits"]
    kept = first.copy()
    runner.run({"input": images[2:4]})
    assert np.array_equal(first, kept)


def test_describe_says_what_ran(models):
    info = OpenVinoRunner(models["fp32"], inference_precision="f32", threads=1).describe()
    assert info["execution_precision"] == "f32"
    assert info["threads"] == 1
    assert info["device"] and info["optimization_capabilities"]
    assert openvino_version() in info["runtime"]


def test_corrupt_or_missing_ir_names_the_file(models, tmp_path):
    with pytest.raises(PipelineError, match="not found: .*absent.xml"):
        OpenVinoRunner(tmp_path / "absent.xml")

    no_bin = tmp_path / "no_bin.xml"
    shutil.copy(models["fp32"], no_bin)
    with pytest.raises(PipelineError, match="not found: .*no_bin.bin"):
        OpenVinoRunner(no_bin)

    broken_xml = tmp_path / "broken.xml"
    broken_xml.write_text("<net><layers")
    shutil.copy(models["fp32"].with_suffix(".bin"), broken_xml.with_suffix(".bin"))
    with pytest.raises(PipelineError, match="broken.xml: Unable to read the model"):
        OpenVinoRunner(broken_xml)

    truncated = tmp_path / "truncated.xml"
    shutil.copy(models["fp32"], truncated)
    truncated.with_suffix(".bin").write_bytes(models["fp32"].with_suffix(".bin").read_bytes()[:100])
    with pytest.raises(PipelineError, match="truncated.xml: Incorrect weights in bin") as error:
        OpenVinoRunner(truncated)
    assert "\n" not in str(error.value)


def test_bad_arguments_are_one_line_errors(models, tmp_path):
    with pytest.raises(PipelineError, match="IR precision must be one of"):
        convert_to_ir(models["onnx"], tmp_path / "x.xml", "int8")
    with pytest.raises(PipelineError, match="not found: .*absent.onnx"):
        convert_to_ir(tmp_path / "absent.onnx", tmp_path / "x.xml")
    with pytest.raises(PipelineError, match="inference precision must be one of"):
        OpenVinoRunner(models["fp32"], inference_precision="fp32")


def test_the_precision_rule_pins_only_the_fp32_ir():
    from targets.openvino import inference_precision, precision_hint

    assert inference_precision("fp32", "auto") == "f32"  # the lossless reference IR, whatever is configured
    assert inference_precision("fp32", "bf16") == "f32"
    assert inference_precision("fp16", "auto") == "auto" and inference_precision("int8", "bf16") == "bf16"
    assert precision_hint("auto") is None and precision_hint(None) is None and precision_hint("") is None
    assert precision_hint("f32") == "f32"
