"""The GPU targets on the build host: FP16 and FP16-typed Q/DQ ONNX models, the bundle, the deferred engine.

The session's small INT8 EfficientNet-Lite0 build for `desktop-gpu` (tests/builds.py: genuine ImageNet
weights, small image counts) is shared by every test. Every host stage runs for real in ONNX Runtime; the TensorRT engine
needs TensorRT and a GPU: where they are missing (always on development machines) the build defers it
to the device, which is what these tests check; where they are present the engine's check is checked.
"""

import json
import shutil

import numpy as np
import onnx
import pytest

from pipeline.artifact import Bundle
from targets.cpu_features import int8_pairs_saturate
from targets.onnxruntime import OnnxRuntimeRunner
from targets.runner import predict
from tests.builds import SmallBuild
from tests.stages.test_bundle import check_manifest_files, rerun_rebuilds_nothing

GPU_STAGES = ["reference", "export", "simplify", "fp16", "calibrate", "quantize", "quantize_fp16", "bundle"]
BUNDLED_ONNX = ["models/fp32.onnx", "models/fp16.onnx", "models/int8_qdq.onnx", "models/int8_qdq_fp16.onnx",
                "models/int8_qdq_fallback.onnx"]


def _tensorrt_status():
    from targets.tensorrt.device_info import tensorrt_status

    return tensorrt_status()


@pytest.fixture(scope="module")
def gpu_build(small_gpu_build) -> SmallBuild:
    return small_gpu_build


@pytest.fixture(scope="module")
def bundle(gpu_build) -> Bundle:
    return Bundle.open(gpu_build.root / "bundle")


def test_gpu_build_runs_the_gpu_stages_and_deploys_the_bundle(gpu_build):
    root = gpu_build.root
    manifest = json.loads((root / "manifest.json").read_text())
    assert list(manifest["stages"]) == GPU_STAGES
    assert manifest["deployed"]["stage"] == "bundle" and manifest["deployed"]["artifact"] == "bundle/manifest.json"
    assert manifest["bundle"] == {"folder": "bundle", "archive": "bundle.tar.gz"}
    for stage in ("fp16", "quantize_fp16"):
        drift = manifest["stages"][stage]["drift"]
        assert drift["passed"], drift["failures"]
        assert "fp16" in manifest["stages"][stage]["precision_ran"]
    assert manifest["stages"]["fp16"]["drift"]["agreement"] >= 0.99
    assert manifest["stages"]["fp16"]["drift"]["cosine"] >= 0.999  # FP16 computed right (optimizations off)
    assert manifest["stages"]["quantize_fp16"]["drift"]["images"] == 96


def test_bundle_lists_every_file_and_opens(gpu_build, bundle):
    manifest = check_manifest_files(gpu_build.root / "bundle")
    assert set(manifest["artifacts"]) == {"fp32", "fp16", "int8"}
    int8 = bundle.artifact("int8")
    assert int8["file"] == "models/int8_qdq.onnx" and int8["strongly_typed"] == "models/int8_qdq_fp16.onnx"
    assert int8["fallback"] == "models/int8_qdq_fallback.onnx" and int8["calibration"] == "calibration.json"
    assert manifest["tensorrt"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 4, "workspace_mib": 512,
                                    "dla_core": -1, "dla_batch": 1, "min_dla_layers": 0.0,
                                    "timing_cache": "tensorrt-timing.cache"}
    assert not any("--useDLACore" in line for line in manifest["trtexec"])  # no DLA core configured
    assert manifest["expected"]["fp16"]["host_proxy"] is True and manifest["expected"]["fp32"]["host_proxy"] is False
    # The engines are judged on TensorRT's budgets (tensorrt_int8 from small.yaml; fp32 allows TF32).
    assert manifest["budgets"]["int8"] == {"max_top1_drop": 3.0}
    assert manifest["budgets"]["fp16"] == {"min_agreement": 0.99}
    assert manifest["budgets"]["fp32"] == {"min_agreement": 0.999, "min_cosine": 0.9999}
    readme = bundle.path("README.md").read_text()
    assert "--system-site-packages" in readme and "cuda-python>=12.6,<12.7" in readme
    assert "python -m pipeline device-build ." in readme and manifest["wheel"] in readme


@pytest.mark.parametrize("relative", BUNDLED_ONNX)
def test_golden_outputs_reproduce_in_onnx_runtime(bundle, relative):
    tolerance = bundle.manifest["tolerance"]
    precision = {"models/fp32.onnx": "fp32", "models/fp16.onnx": "fp16"}.get(relative, "int8")
    limit = tolerance[precision]["variants"].get(relative, tolerance[precision]["max_abs"])
    fp16_typed = relative in ("models/fp16.onnx", "models/int8_qdq_fp16.onnx")
    # On a CPU without VNNI the INT8 models' golden logits are their exact arithmetic (what TensorRT computes).
    exact = precision == "int8" and int8_pairs_saturate()
    runner = OnnxRuntimeRunner(bundle.path(relative), fp16_typed=fp16_typed, exact=exact)
    crops, _, reference = bundle.golden()
    logits = predict(runner, crops, 8, prepare=bundle.normalize)
    assert np.max(np.abs(logits - reference)) <= limit
    if precision == "fp32":
        assert limit < 0.01  # the simplified FP32 ONNX is the reference up to float rounding


def test_golden_data_and_intermediates(bundle, gpu_build):
    root = gpu_build.root
    crops, labels, reference = bundle.golden()
    assert crops.shape == (40, 224, 224, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(reference, np.load(root / "reference" / "logits.npy")[:40])
    golden = bundle.manifest["golden"]
    names = golden["intermediate_tensors"]
    assert 5 <= len(names) <= 20 and golden["intermediate_images"] == 2
    stored = np.load(bundle.path(golden["intermediates"]))
    assert list(stored.files) == names
    assert bundle.path(golden["intermediates"]).stat().st_size < 40e6
    # The stored values are the FP32 ONNX's: recompute the last one and compare (float16 storage).
    model = onnx.load(str(bundle.path("models/fp32.onnx")))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(names[-1]))
    marked = root / "marked-for-test.onnx"
    onnx.save(model, str(marked))
    import onnxruntime as ort

    session = ort.InferenceSession(str(marked), providers=["CPUExecutionProvider"])
    value = session.run([names[-1]], {"input": bundle.normalize(crops[:2])})[0]
    marked.unlink()
    assert stored[names[-1]].dtype == np.float16 and stored[names[-1]].shape == value.shape
    np.testing.assert_allclose(stored[names[-1]].astype(np.float32), value, rtol=2e-3, atol=2e-3)
    consumers = {node.output[0]: node.op_type for node in model.graph.node}
    assert {consumers[name] for name in names} <= {"Concat", "Add"}


def test_calibration_table_covers_every_quantized_tensor(bundle, tmp_path):
    from pipeline.stages.quantize.qdq import quantized_activations

    table = json.loads(bundle.path("calibration.json").read_text())
    qdq = onnx.load(str(bundle.path("models/int8_qdq.onnx")))
    activations = {node.input[0] for node in qdq.graph.node if node.op_type == "QuantizeLinear"}
    assert activations and activations <= set(table["tensors"])
    assert set(quantized_activations(bundle.path("models/fp32.onnx"))) == set(table["tensors"])
    try:
        from targets.tensorrt.calibration_cache import amax_from_table, read_legacy_cache, write_legacy_cache
    except ImportError as error:
        pytest.skip(f"targets.tensorrt.calibration_cache is not there yet ({error})")
    cache = write_legacy_cache(amax_from_table(table), "10.3.0", tmp_path / "calibration.cache")
    header, scales = read_legacy_cache(cache)
    assert header.startswith("TRT-") and "EntropyCalibration2" in header
    assert set(scales) >= activations
    for name in activations:
        assert scales[name] == pytest.approx(table["tensors"][name]["amax"] / 127.0, rel=1e-6)


def test_every_file_a_trtexec_line_names_exists(bundle):
    try:
        from targets.tensorrt.trtexec import files_named
    except ImportError as error:
        pytest.skip(f"targets.tensorrt.trtexec is not there yet ({error})")
    lines = bundle.manifest["trtexec"]
    assert lines and bundle.path("trtexec.txt").read_text().splitlines() == lines
    named = files_named(lines)
    assert "models/int8_qdq.onnx" in named and "models/int8_qdq_fp16.onnx" in named
    for relative in named:
        assert bundle.path(relative).is_file(), relative


def test_fp16_typed_qdq_model_has_fp16_tensors_fp16_scales_and_int8_weights(bundle):
    from pipeline.stages.fp16 import FP16_QDQ_OPSET, describe_fp16_qdq

    model = onnx.load(str(bundle.path("models/int8_qdq_fp16.onnx")))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= FP16_QDQ_OPSET
    facts = describe_fp16_qdq(model)
    assert facts["scale_types"] == ["float16"] and facts["weight_types"] == ["int8"]
    assert facts["float_initializer_types"] == ["float16"]  # every float weight / bias / scale
    graph = model.graph
    fp32_io = onnx.TensorProto.FLOAT
    assert graph.input[0].type.tensor_type.elem_type == fp32_io == graph.output[0].type.tensor_type.elem_type
    # Every quantized Conv reads its weights through a DequantizeLinear of an int8 initializer (not folded).
    initializers = {init.name: init for init in graph.initializer}
    produced_by = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    excluded = set(bundle.artifact("int8")["layers_in_float"])
    for conv in convs:
        if conv.name in excluded:
            continue
        weight = produced_by[conv.input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
    assert facts["weight_dequantize"] == len(convs) - len(excluded)
    # Same Q/DQ placement as the FP32-typed model.
    qdq = onnx.load(str(bundle.path("models/int8_qdq.onnx")))
    count = lambda m, op: sum(1 for n in m.graph.node if n.op_type == op)  # noqa: E731
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv"):
        assert count(model, op) == count(qdq, op)
    # And the FP16 model keeps float32 input / output around float16 weights.
    fp16 = onnx.load(str(bundle.path("models/fp16.onnx")))
    assert fp16.graph.input[0].type.tensor_type.elem_type == fp32_io
    assert {init.data_type for init in fp16.graph.initializer if init.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}


def test_the_gate_judges_the_tensorrt_model_as_tensorrt_computes_it(gpu_build):
    """TensorRT accumulates INT8 in int32. On a CPU without VNNI the host's INT8 kernels would saturate the signed,
    full-range Q/DQ model's pair sums (Lite0: 1.5 dB against 19.2 dB exact), so the gate judges it in ONNX
    Runtime's exact arithmetic and leaves OpenVINO out; elsewhere it judges both back ends."""
    gate = json.loads((gpu_build.root / "quantize" / "gate.json").read_text())
    judged_on_openvino = [attempt["details"]["openvino"] is not None for attempt in gate["attempts"]]
    if int8_pairs_saturate():
        assert "no VNNI" in gate["openvino_skipped"] and not any(judged_on_openvino)
        assert gate["passed"] and gate["excluded_layers"] == []  # judged exactly, Lite0 needs no fallback
    else:
        assert "openvino_skipped" not in gate and all(judged_on_openvino)


def test_fallback_variant_keeps_more_layers_in_float(bundle, gpu_build):
    from pipeline.stages.bundle.models import fallback_layers

    gate = json.loads((gpu_build.root / "quantize" / "gate.json").read_text())
    int8 = bundle.artifact("int8")
    extra = fallback_layers(gate, 2)
    assert len(extra) == 4 and not set(extra) & set(gate["excluded_layers"])
    assert int8["fallback_layers_in_float"] == gate["excluded_layers"] + extra
    model = onnx.load(str(bundle.path("models/int8_qdq_fallback.onnx")))
    initializers = {init.name for init in model.graph.initializer}
    in_float = {node.name for node in model.graph.node if node.op_type == "Conv" and node.input[1] in initializers}
    assert in_float == set(int8["fallback_layers_in_float"])


def test_engine_is_deferred_or_checked(gpu_build, capsys):
    """A cached rerun rebuilds nothing and, without TensorRT, says once that the engine is deferred."""
    root = gpu_build.root
    capsys.readouterr()
    rerun_rebuilds_nothing(gpu_build)
    err = capsys.readouterr().err
    manifest = json.loads((root / "manifest.json").read_text())
    ok, reason = _tensorrt_status()
    if ok:  # a machine with TensorRT and a GPU: the engine was built and checked like a stage
        assert manifest["tensorrt"]["passed"] is True and manifest["tensorrt"]["drift"]["passed"] is True
        assert "deferred" not in manifest
        return
    assert manifest["deferred"] == {"stage": "tensorrt", "reason": reason}
    flat = " ".join(err.split())
    assert flat.count("TensorRT engine: deferred to the device") == 1
    assert "python -m pipeline device-build bundle.tar.gz" in flat


def test_gpu_archive_opens_on_the_device(gpu_build, tmp_path):
    copy = tmp_path / "bundle.tar.gz"
    shutil.copyfile(gpu_build.root / "bundle.tar.gz", copy)
    bundle = Bundle.open(copy)
    assert bundle.target == "desktop-gpu" and bundle.path("models/int8_qdq_fp16.onnx").is_file()


def test_fp16_conversion_of_a_missing_model_is_one_clear_error(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.stages.fp16 import write_fp16_model, write_fp16_qdq_model

    for convert in (write_fp16_model, write_fp16_qdq_model):
        with pytest.raises(PipelineError, match="ONNX model not found"):
            convert(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
