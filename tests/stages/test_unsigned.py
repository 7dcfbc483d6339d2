"""Unsigned INT8 for never-negative activations (`quantization.unsigned_activations`, the CPU target only):
which tensors qualify, the pairs it writes (UINT8, zero point 0, scale amax/255, the same calibrated range),
that the GPU targets keep TensorRT's signed INT8, and that on EfficientNet-Lite0 it lowers the logit error."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.stages.quantize.qdq import describe_placement, write_qdq_model  # noqa: E402
from pipeline.stages.quantize.unsigned import nonnegative_tensors, unsigned_activations  # noqa: E402
from tests.stages.test_quantize import block_graph, lite0_images, logit_sqnr_db, minmax_amax, run_logits  # noqa: E402


def _graph(nodes, initializers=()):
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                             [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                             list(initializers))


def test_never_negative_tensors_follow_relu_relu6_and_the_ops_that_keep_the_sign():
    constant = lambda name, value: numpy_helper.from_array(np.array(value, np.float32), name)  # noqa: E731
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    graph = _graph([
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Clip", ["x", "zero", "six"], ["relu6"]),
        helper.make_node("Clip", ["x", "minus_one", "six"], ["clip_negative"]),
        helper.make_node("Concat", ["relu", "relu6"], ["cat"], axis=1),
        helper.make_node("Concat", ["relu", "clip_negative"], ["cat_mixed"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["pool"], kernel_shape=[2, 2]),
        helper.make_node("Pad", ["pool", "pads"], ["padded"], mode="constant"),
        helper.make_node("Pad", ["pool", "pads"], ["reflected"], mode="reflect"),
        helper.make_node("Pad", ["pool", "pads", "one"], ["padded_one"], mode="constant"),
        helper.make_node("Add", ["relu", "relu6"], ["sum"]),  # two non-negative inputs, but not an op we trust
        helper.make_node("Reshape", ["pool", "shape"], ["flat"]),  # its shape input is no value of the tensor
        helper.make_node("Reshape", ["clip_negative", "shape"], ["flat_negative"]),
        helper.make_node("Conv", ["padded", "w"], ["conv"]),
        # A pair with zero point 0 keeps the sign (a pool or a head reading it); one with another zero point not.
        helper.make_node("QuantizeLinear", ["relu", "scale", "int8_zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "int8_zero"], ["dq"]),
        helper.make_node("GlobalAveragePool", ["dq"], ["pooled_dq"]),
        helper.make_node("QuantizeLinear", ["relu", "scale", "uint8_shifted"], ["q_shifted"]),
        helper.make_node("DequantizeLinear", ["q_shifted", "scale", "uint8_shifted"], ["dq_shifted"]),
        helper.make_node("QuantizeLinear", ["clip_negative", "scale", "int8_zero"], ["q_negative"]),
    ], [constant("zero", 0.0), constant("six", 6.0), constant("minus_one", -1.0), constant("one", 1.0), pads,
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w"), constant("scale", 0.1),
        numpy_helper.from_array(np.int8(0), "int8_zero"), numpy_helper.from_array(np.uint8(128), "uint8_shifted")])
    assert nonnegative_tensors(graph) == {"relu", "relu6", "cat", "pool", "padded", "flat", "q", "dq", "pooled_dq"}


def test_block_pairs_on_relu_outputs_become_uint8_with_the_same_range(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(block_graph(), str(path))
    images = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    amax = minmax_amax(path, images)
    signed, unsigned = tmp_path / "int8.onnx", tmp_path / "uint8.onnx"
    write_qdq_model(path, amax, signed)
    summary = write_qdq_model(path, amax, unsigned, unsigned=True)
    model = onnx.load(str(unsigned))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    pairs = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert set(pairs) == {"input", "t", "cat"} and summary.unsigned_pairs == 1  # t = Relu(stem)
    for tensor, node in pairs.items():
        scale, zero = arrays[node.input[1]], arrays[node.input[2]]
        assert zero == 0 and zero.dtype == (np.uint8 if tensor == "t" else np.int8)
        np.testing.assert_allclose(scale, amax[tensor] / (255 if tensor == "t" else 127), rtol=1e-6)
        readers = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]]
        assert readers and all(list(r.input[1:]) == list(node.input[1:]) for r in readers)
    assert describe_placement(unsigned)["zero_point_dtypes"] == ["int8", "uint8"]
    assert describe_placement(signed)["zero_point_dtypes"] == ["int8"]
    onnx.checker.check_model(model)
    reference, quantized = run_logits(path, images), run_logits(unsigned, images)
    assert logit_sqnr_db(reference, quantized) > 20


def test_only_the_cpu_target_writes_unsigned_pairs():
    assert unsigned_activations(load_config(None, {"target": "cpu"}))
    assert not unsigned_activations(load_config(None, {"target": "cpu", "quantization": {"unsigned_activations": False}}))
    for target in ("jetson", "desktop-gpu"):  # TensorRT: signed INT8 Q/DQ only
        assert not unsigned_activations(load_config(None, {"target": target}))


def test_the_small_builds_cpu_qdq_is_unsigned_where_it_may_be_and_the_gpu_ones_signed(small_cpu_build, small_gpu_build):
    cpu = onnx.load(str(small_cpu_build.root / "quantize" / "model.onnx"))
    never_negative = nonnegative_tensors(cpu.graph)
    arrays = {i.name: numpy_helper.to_array(i) for i in cpu.graph.initializer}
    kinds = {n.input[0]: arrays[n.input[2]].dtype for n in cpu.graph.node if n.op_type == "QuantizeLinear"}
    assert sum(kind == np.uint8 for kind in kinds.values()) == 32  # every ReLU6 output a Conv reads
    assert all((kind == np.uint8) == (tensor in never_negative) for tensor, kind in kinds.items())
    assert describe_placement(small_gpu_build.root / "quantize" / "model.onnx")["zero_point_dtypes"] == ["int8"]


def test_unsigned_pairs_lower_lite0s_logit_error(small_cpu_build, imagenet, tmp_path):
    """The small build's own table; 48 val images it never calibrated on: half the rounding step on 32 of the 49
    quantized tensors raised logit SQNR by about 2 dB here and on the gate's decision images."""
    from calibration.statistics import CalibrationTable

    fp32 = small_cpu_build.root / "simplify" / "model.onnx"
    amax = CalibrationTable.load(small_cpu_build.root / "calibrate" / "calibration.json").amax
    _, images, _ = lite0_images(imagenet, calibration=1, evaluation=48)
    reference = run_logits(fp32, images)
    figures = {}
    for unsigned in (False, True):
        path = tmp_path / f"unsigned-{unsigned}.onnx"
        write_qdq_model(fp32, amax, path, unsigned=unsigned)
        figures[unsigned] = logit_sqnr_db(reference, run_logits(path, images))
    assert figures[True] > figures[False] + 0.5, figures
