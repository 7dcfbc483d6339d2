"""The classifier head in INT8 (`quantization.int8_head`, off by default): which tensors it ranges, the pairs and
int8 weights it writes (Gemm and MatMul, with and without the overflow fix, UINT8 through the global pool), and
that OpenVINO then runs EfficientNet-Lite0's pool and fully-connected layer in u8, as it runs NNCF's IR."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.stages.quantize.head import head_layers  # noqa: E402
from pipeline.stages.quantize.overflow import PAIR_LEVELS  # noqa: E402
from pipeline.stages.quantize.qdq import describe_placement, quantized_activations, write_qdq_model  # noqa: E402
from tests.stages.test_quantize import block_graph, lite0_images, logit_sqnr_db, run_logits  # noqa: E402


def _arrays(model) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _reader_pair(model, node_name: str, index: int):
    """The (QuantizeLinear, DequantizeLinear) pair input `index` of node `node_name` reads, or None."""
    nodes = {out: node for node in model.graph.node for out in node.output}
    reader = next(node for node in model.graph.node if node.name == node_name)
    dq = nodes.get(reader.input[index])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return nodes.get(dq.input[0]), dq


def _weight_dequantize(model, node_name: str):
    reader = next(node for node in model.graph.node if node.name == node_name)
    return next(node for node in model.graph.node if node.output[0] == reader.input[1])


def runtime_precisions(xml) -> dict[str, set[str]]:
    """{layer type: the precisions it runs in} of an IR as OpenVINO's CPU plugin compiled it."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 2})
    found: dict[str, set[str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        found.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
    return found


def _images(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)


def _head_amax(path, images) -> dict[str, float]:
    from calibration.statistics import collect_ranges

    tensors = quantized_activations(path, int8_head=True)
    return collect_ranges(path, tensors, [images[i:i + 8] for i in range(0, len(images), 8)], method="minmax",
                          threads=2).amax


def test_the_option_ranges_the_pool_input_and_the_head_input(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(block_graph(), str(path))
    assert quantized_activations(path) == ["input", "t", "cat"]
    assert quantized_activations(path, int8_head=True) == ["input", "t", "cat", "c_pool", "features"]
    (head,) = head_layers(onnx.load(str(path)).graph)
    assert (head.node, head.input, head.weight, head.axis, head.pooled) == ("fc", "features", "w_fc", 0, "c_pool")


def test_a_gemm_head_reads_int8_through_its_pool_with_per_channel_int8_weights(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(block_graph(), str(path))
    images = _images()
    amax = _head_amax(path, images)
    plain, headed = tmp_path / "plain.onnx", tmp_path / "head.onnx"
    write_qdq_model(path, amax, plain)
    summary = write_qdq_model(path, amax, headed, int8_head=True)
    assert summary.int8_heads == 1 and write_qdq_model(path, amax, tmp_path / "again.onnx").int8_heads == 0
    model = onnx.load(str(headed))
    arrays = _arrays(model)
    for reader, tensor in (("gap", "c_pool"), ("fc", "features")):
        quantize, _ = _reader_pair(model, reader, 0)
        assert quantize.input[0] == tensor and arrays[quantize.input[2]] == 0
        np.testing.assert_allclose(arrays[quantize.input[1]], amax[tensor] / 127, rtol=1e-6)
    weights = _weight_dequantize(model, "fc")
    w = numpy_helper.to_array(next(i for i in block_graph().graph.initializer if i.name == "w_fc"))
    assert arrays[weights.input[0]].dtype == np.int8 and helper.get_attribute_value(weights.attribute[0]) == 0
    np.testing.assert_allclose(arrays[weights.input[1]], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    np.testing.assert_allclose(arrays[weights.input[0]] * arrays[weights.input[1]][:, None], w,
                               atol=arrays[weights.input[1]].max() / 2 + 1e-7)
    assert "w_fc" not in arrays and "b_fc" in arrays  # the float weights are gone; the bias stays float
    placement = describe_placement(model)
    assert placement["gemm_input_quantized"] and not describe_placement(plain)["gemm_input_quantized"]
    assert placement["dequantized_inputs_of"]["GlobalAveragePool"] == 1 and not placement["graph_output_quantized"]
    onnx.checker.check_model(model)
    reference = run_logits(path, images)
    assert logit_sqnr_db(reference, run_logits(headed, images)) > 20


def _matmul_head() -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul (weights in x out) -> Add: a head without Gemm,
    with large neighbouring weights of one sign (what saturates a CPU without VNNI)."""
    rng = np.random.default_rng(2)
    w_fc = rng.normal(0, 0.3, (6, 5)).astype(np.float32)
    w_fc[0:2, 0] = [1.0, 0.9]
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv"], "conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], "relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"], "gap"),
             helper.make_node("Flatten", ["gap"], ["features"], "flatten"),
             helper.make_node("MatMul", ["features", "w_fc"], ["product"], "fc"),
             helper.make_node("Add", ["product", "b_fc"], ["logits"], "bias")]
    initializers = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(w_fc, "w_fc"), numpy_helper.from_array(np.zeros(5, np.float32), "b_fc")]
    graph = helper.make_graph(nodes, "matmul_head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_matmul_head_is_uint8_through_the_pool_and_saturation_safe_with_the_overflow_fix(tmp_path):
    path = tmp_path / "matmul.onnx"
    onnx.save(_matmul_head(), str(path))
    images = _images(3)
    amax = _head_amax(path, images)
    output = tmp_path / "head.onnx"
    summary = write_qdq_model(path, amax, output, unsigned=True, overflow_fix=True, int8_head=True)
    model = onnx.load(str(output))
    arrays = _arrays(model)
    # The pool reads the Relu output's pair, the head the pooled features': both never negative, so both UINT8.
    assert summary.int8_heads == 1 and summary.unsigned_pairs == 2
    for reader, tensor in (("gap", "relu"), ("fc", "features")):
        quantize, _ = _reader_pair(model, reader, 0)
        assert quantize.input[0] == tensor and arrays[quantize.input[2]].dtype == np.uint8
        np.testing.assert_allclose(arrays[quantize.input[1]], amax[tensor] / 255, rtol=1e-6)
    weights = _weight_dequantize(model, "fc")
    assert helper.get_attribute_value(weights.attribute[0]) == 1  # (in, out): the output channels are axis 1
    safe = arrays[weights.input[0]].astype(np.int32)
    assert np.abs(safe[:-1] + safe[1:]).max() <= PAIR_LEVELS  # the weights of neighbouring inputs, per output
    write_qdq_model(path, amax, tmp_path / "full.onnx", unsigned=True, int8_head=True)
    full_range = onnx.load(str(tmp_path / "full.onnx"))
    full = _arrays(full_range)[_weight_dequantize(full_range, "fc").input[0]].astype(np.int32)
    assert np.abs(full[:-1] + full[1:]).max() > PAIR_LEVELS and np.abs(full).max() == 127
    onnx.checker.check_model(model)
    reference = run_logits(path, images)
    assert logit_sqnr_db(reference, run_logits(output, images)) > 20


def test_lite0s_head_runs_in_u8_in_openvino_as_nncfs_does(small_cpu_build, imagenet, tmp_path):
    """The small build's FP32 ONNX, minmax ranges over 16 calibration images, 48 val images: with the option
    OpenVINO runs the global pool and the fully-connected layer in u8 (without it, in float), and the head's
    rounding costs little logit SQNR (0.2 dB on the default build's decision images, docs/results.md)."""
    pytest.importorskip("openvino")
    from targets.openvino import convert_to_ir

    fp32 = small_cpu_build.root / "simplify" / "model.onnx"
    calibration, images, _ = lite0_images(imagenet, calibration=16, evaluation=48)
    amax = _head_amax(fp32, calibration)
    reference = run_logits(fp32, images)
    precisions, sqnr = {}, {}
    for int8_head in (False, True):
        path = tmp_path / f"head-{int8_head}.onnx"
        write_qdq_model(fp32, amax, path, unsigned=True, int8_head=int8_head)
        sqnr[int8_head] = logit_sqnr_db(reference, run_logits(path, images))
        precisions[int8_head] = runtime_precisions(convert_to_ir(path, tmp_path / f"head-{int8_head}.xml", "fp32"))
    assert precisions[True]["FullyConnected"] == {"u8"} and precisions[True]["Reduce"] == {"u8"}
    assert "u8" not in precisions[False]["FullyConnected"] and "u8" not in precisions[False]["Reduce"]
    assert sqnr[True] > sqnr[False] - 1.0, sqnr
