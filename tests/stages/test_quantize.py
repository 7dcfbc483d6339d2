"""INT8 Q/DQ ONNX: numerics and placement TensorRT needs, and accuracy on EfficientNet-Lite0.

The placement rules are checked on a small hand-built graph with every case in it (a tensor read
by two Convs, a pool and a residual Add; a Concat; a Gemm head); the numerics and the accuracy on
EfficientNet-Lite0 with its real ImageNet weights and real ImageNet images.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.stages.quantize.qdq import describe_placement, quantized_activations, write_qdq_model  # noqa: E402

LITE0 = "efficientnet_lite0"


# ---------------------------------------------------------------------------- helpers shared with test_sensitivity


def export_lite0(path) -> str:
    """EfficientNet-Lite0 with its ImageNet weights, exported and simplified as the pipeline does."""
    pytest.importorskip("torch")
    onnxsim = pytest.importorskip("onnxsim")
    import torch

    from pipeline.weights import load_model

    try:
        model = load_model(LITE0, "imagenet")
    except PipelineError as error:
        pytest.skip(f"EfficientNet-Lite0 weights not available: {error}")
    raw = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(model.module, torch.zeros(1, 3, 224, 224), str(raw), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    simplified, ok = onnxsim.simplify(onnx.load(str(raw)))
    assert ok
    onnx.save(simplified, str(path))
    return str(path)


def lite0_images(imagenet, calibration: int, evaluation: int):
    """(calibration inputs, evaluation inputs, evaluation labels): float32 NCHW, balanced, seeded."""
    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.sampling import select_balanced
    from pipeline.models import get_spec

    preprocessing = get_spec(LITE0).preprocessing
    data = open_imagenet(imagenet)
    calib = load_images(select_balanced(data.calibration.records, calibration, seed=0), preprocessing)
    val = load_images(select_balanced(data.evaluation.records, evaluation, seed=0), preprocessing)
    return preprocessing.normalize(calib.crops), preprocessing.normalize(val.crops), val.labels


def minmax_amax(onnx_path, images) -> dict[str, float]:
    from calibration.statistics import collect_ranges

    batches = [images[i:i + 16] for i in range(0, len(images), 16)]
    return collect_ranges(onnx_path, quantized_activations(onnx_path), batches, method="minmax", threads=2).amax


def run_logits(path, images, batch_size: int = 32, exact: bool = False) -> np.ndarray:
    """`exact`: ONNX Runtime's graph optimizations off, so each DequantizeLinear and Conv runs in float."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def logit_sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((candidate - ref) ** 2)))


def quantized_lite0(folder, imagenet) -> dict:
    """Lite0's FP32 ONNX, minmax ranges over 64 calibration images, its Q/DQ model, 64 val images."""
    fp32 = export_lite0(folder / "lite0.onnx")
    calibration, evaluation, labels = lite0_images(imagenet, calibration=64, evaluation=64)
    amax = minmax_amax(fp32, calibration)
    qdq = folder / "lite0_qdq.onnx"
    summary = write_qdq_model(fp32, amax, qdq)
    return {"fp32": fp32, "qdq": qdq, "amax": amax, "summary": summary, "folder": folder,
            "calibration": calibration, "evaluation": evaluation, "labels": labels}


def nodes_reading(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def producer(graph, tensor: str):
    return next((n for n in graph.node if tensor in n.output), None)


def is_dequantized(graph, tensor: str) -> bool:
    node = producer(graph, tensor)
    return node is not None and node.op_type == "DequantizeLinear"


# ---------------------------------------------------------------------------- placement on a small graph


def block_graph() -> onnx.ModelProto:
    """input -> stem Conv -> Relu = t; t -> conv_a, conv_b, MaxPool, and the skip of a residual Add
    (t + conv_a); Concat(conv_b, pool, add) -> conv_c; AveragePool of conv_c's output feeds no Conv;
    GlobalAveragePool -> Flatten -> Gemm -> logits. conv_b's weights come from a Constant node, as
    onnxsim leaves Inception-ResNet's residual projections."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Constant", [], ["w_b"], "w_b_constant", value=weight("w_b", 6, 4, 1, 1)),
        helper.make_node("Conv", ["input", "w_stem", "b_stem"], ["stem"], "stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["t"], "relu"),
        helper.make_node("Conv", ["t", "w_a"], ["a"], "conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["t", "w_b"], ["b"], "conv_b"),
        helper.make_node("MaxPool", ["t"], ["pool"], "maxpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["t", "a"], ["residual"], "add"),
        helper.make_node("Concat", ["b", "pool", "residual"], ["cat"], "concat", axis=1),
        helper.make_node("Conv", ["cat", "w_c"], ["c"], "conv_c"),
        helper.make_node("AveragePool", ["c"], ["c_pool"], "avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c_pool"], ["gap"], "gap"),
        helper.make_node("Flatten", ["gap"], ["features"], "flatten"),
        helper.make_node("Gemm", ["features", "w_fc", "b_fc"], ["logits"], "fc", transB=1),
    ]
    initializers = [
        weight("w_stem", 4, 3, 3, 3), weight("b_stem", 4), weight("w_a", 4, 4, 3, 3),
        weight("w_c", 5, 14, 1, 1), weight("w_fc", 10, 5), weight("b_fc", 10),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    folder = tmp_path_factory.mktemp("block")
    path = folder / "block.onnx"
    onnx.save(block_graph(), str(path))
    images = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    amax = minmax_amax(path, images)
    qdq = folder / "block_qdq.onnx"
    summary = write_qdq_model(path, amax, qdq)
    return {"fp32": path, "qdq": qdq, "amax": amax, "summary": summary, "folder": folder, "images": images}


def test_the_quantized_tensors_are_the_conv_inputs(block):
    assert quantized_activations(block["fp32"]) == ["input", "t", "cat"]
    assert quantized_activations(block["fp32"], exclude_nodes=["conv_c"]) == ["input", "t"]


def test_a_tensor_read_by_two_convs_and_a_pool_has_one_pair_the_add_reads_float(block):
    graph = onnx.load(str(block["qdq"])).graph
    quantize_t = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "t"]
    assert len(quantize_t) == 1  # one pair for the tensor, shared
    (dequantize_t,) = nodes_reading(graph, quantize_t[0].output[0])
    readers = sorted(n.name for n in nodes_reading(graph, dequantize_t.output[0]))
    assert readers == ["conv_a", "conv_b", "maxpool"]
    add = next(n for n in graph.node if n.name == "add")
    assert list(add.input) == ["t", "a"]  # the skip and the conv branch both stay float
    assert block["summary"].activation_pairs == 3  # input, t, cat: one each
    assert block["summary"].quantized_nodes == ("stem", "conv_a", "conv_b", "conv_c")


def test_concat_output_is_quantized_once_head_and_pools_without_conv_stay_float(block):
    graph = onnx.load(str(block["qdq"])).graph
    conv_c = next(n for n in graph.node if n.name == "conv_c")
    assert is_dequantized(graph, conv_c.input[0])
    assert all(not is_dequantized(graph, name) for name in next(n for n in graph.node if n.name == "concat").input)
    for name in ("avgpool", "gap", "flatten", "fc"):
        node = next(n for n in graph.node if n.name == name)
        assert not any(is_dequantized(graph, i) for i in node.input), name
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "c" in n.input for n in graph.node)
    assert [o.name for o in graph.output] == ["logits"]
    assert producer(graph, "logits").op_type == "Gemm"


def test_placement_facts_of_the_block(block):
    facts = describe_placement(block["qdq"])
    assert facts["activation_pairs"] == 3 and facts["weight_dequantize"] == 4
    assert facts["activation_dq_consumers"] == {"Conv": 4, "MaxPool": 1}
    assert facts["weight_dq_consumers"] == {"Conv": 4}
    assert not facts["add_input_quantized"] and not facts["gemm_input_quantized"]
    assert not facts["graph_output_quantized"] and not facts["bias_quantized"]
    assert facts["weight_scales_per_channel"] and facts["zero_points_all_zero"]
    assert facts["zero_point_dtypes"] == ["int8"] and facts["weight_dtypes"] == ["int8"]


def test_excluded_convs_read_float_tensors_and_float_weights(block):
    path = block["folder"] / "excluded.onnx"
    summary = write_qdq_model(block["fp32"], block["amax"], path, exclude_nodes=["conv_a", "conv_c"])
    graph = onnx.load(str(path)).graph
    for name in ("conv_a", "conv_c"):
        conv = next(n for n in graph.node if n.name == name)
        assert not any(is_dequantized(graph, i) for i in conv.input), name
    conv_b = next(n for n in graph.node if n.name == "conv_b")
    assert is_dequantized(graph, conv_b.input[0]) and is_dequantized(graph, conv_b.input[1])
    assert summary.excluded_nodes == ("conv_a", "conv_c")
    assert summary.quantized_nodes == ("stem", "conv_b")
    assert summary.activation_pairs == 2  # cat is read by no quantized Conv any more


def test_the_block_runs_in_onnxruntime_close_to_float(block):
    images = block["images"]  # the calibration images: no clipping, rounding error only
    reference, quantized = run_logits(block["fp32"], images), run_logits(block["qdq"], images)
    assert logit_sqnr_db(reference, quantized) > 25


def test_residual_adds_read_both_inputs_through_qdq_as_tensorrt_fuses(block):
    """quantization.residual_adds: the Add reads the skip through its shared pair and the Conv output through
    a pair of its own (the pattern TensorRT fuses into the INT8 conv); the model still runs close to float."""
    from calibration.statistics import collect_ranges

    assert quantized_activations(block["fp32"], residual_adds=True) == ["input", "t", "cat", "a"]
    assert quantized_activations(block["fp32"], ["conv_a"], residual_adds=True) == ["input", "t", "cat"]
    amax = {**block["amax"], **collect_ranges(block["fp32"], ["a"], [block["images"]], method="minmax").amax}
    path = block["folder"] / "block_residual.onnx"
    write_qdq_model(block["fp32"], amax, path, residual_adds=True)
    graph = onnx.load(str(path)).graph
    add = next(n for n in graph.node if n.name == "add")
    skip, branch = (producer(graph, name) for name in add.input)
    assert skip.op_type == branch.op_type == "DequantizeLinear"
    shared = next(n for n in graph.node if n.name == "conv_a").input[0]
    assert add.input[0] == shared  # the skip: the very pair conv_a, conv_b and the pool read
    quantize = producer(graph, branch.input[0])
    assert quantize.op_type == "QuantizeLinear" and quantize.input[0] == "a" and nodes_reading(graph, "a") == [quantize]
    scale = next(i for i in graph.initializer if i.name == quantize.input[1])
    assert numpy_helper.to_array(scale) == np.float32(amax["a"] / 127)
    fp32, int8 = run_logits(block["fp32"], block["images"]), run_logits(path, block["images"])
    assert logit_sqnr_db(fp32, int8) > 20
    with pytest.raises(PipelineError, match="no range for 1 quantized tensors"):
        write_qdq_model(block["fp32"], block["amax"], block["folder"] / "no_range.onnx", residual_adds=True)


def test_missing_ranges_and_unknown_exclusions_fail_clearly(block):
    with pytest.raises(PipelineError, match="no range for 1 quantized tensors"):
        write_qdq_model(block["fp32"], {"input": 1.0, "t": 1.0}, block["folder"] / "x.onnx")
    with pytest.raises(PipelineError, match="finite and positive"):
        write_qdq_model(block["fp32"], {"input": 1.0, "t": float("nan"), "cat": 1.0}, block["folder"] / "x.onnx")
    with pytest.raises(PipelineError, match="not a Conv"):
        write_qdq_model(block["fp32"], block["amax"], block["folder"] / "x.onnx", exclude_nodes=["fc"])
    assert not (block["folder"] / "x.onnx").exists()


# ---------------------------------------------------------------------------- EfficientNet-Lite0, real weights


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, imagenet):
    return quantized_lite0(tmp_path_factory.mktemp("lite0"), imagenet)


def test_lite0_weights_are_int8_per_channel_with_zero_points_0(lite0):
    model = onnx.load(str(lite0["qdq"]))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert len(weight_dq) == 49  # every Conv of Lite0
    for node in weight_dq:
        weights, scale, zero_point = (initializers[name] for name in node.input)
        assert weights.dtype == np.int8 and zero_point.dtype == np.int8
        assert next(a.i for a in node.attribute if a.name == "axis") == 0
        assert scale.shape == zero_point.shape == (weights.shape[0],)  # one per output channel
        assert not zero_point.any()
        assert np.abs(weights).max() == 127  # symmetric: the largest weight of some channel maps to 127
        assert [c.op_type for c in nodes_reading(model.graph, node.output[0])] == ["Conv"]


def test_lite0_activations_are_int8_per_tensor_scale_amax_over_127(lite0):
    model = onnx.load(str(lite0["qdq"]))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert {n.input[0] for n in quantize} == set(quantized_activations(lite0["fp32"]))
    for node in quantize:
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        assert scale.shape == () and zero_point.dtype == np.int8 and zero_point == 0
        np.testing.assert_allclose(scale, lite0["amax"][node.input[0]] / 127, rtol=1e-6)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in initializers]
    assert len(dequantize) == len(quantize) == lite0["summary"].activation_pairs == 49


def test_lite0_adds_gemm_and_logits_stay_float(lite0):
    facts = describe_placement(lite0["qdq"])
    assert facts["activation_dq_consumers"] == {"Conv": 49}
    assert facts["dequantized_inputs_of"] == {"Add": 0, "Concat": 0, "Gemm": 0, "GlobalAveragePool": 0, "MatMul": 0}
    assert not facts["graph_output_quantized"] and not facts["bias_quantized"]
    graph = onnx.load(str(lite0["qdq"])).graph
    assert producer(graph, "logits").op_type == "Gemm"
    # The conv branch of every residual Add is a Conv output, never quantized.
    for add in (n for n in graph.node if n.op_type == "Add"):
        assert any(producer(graph, i).op_type == "Conv" for i in add.input)


def test_lite0_int8_agrees_with_fp32_on_real_images(lite0):
    from targets.cpu_features import int8_pairs_saturate

    reference = run_logits(lite0["fp32"], lite0["evaluation"])
    # This model keeps full-range weights. On a CPU whose INT8 kernels saturate pair sums (AVX2 without
    # VNNI: 82.8% agreement there) it is judged in its exact arithmetic; the fix for those CPUs is
    # tested in tests/stages/test_overflow.py.
    quantized = run_logits(lite0["qdq"], lite0["evaluation"], exact=int8_pairs_saturate())
    labels = lite0["labels"]
    agreement = np.mean(reference.argmax(1) == quantized.argmax(1))
    top1_drop = 100 * (np.mean(reference.argmax(1) == labels) - np.mean(quantized.argmax(1) == labels))
    # Measured: 96.9% agreement on these 64 images (98.8% and -0.3 points top-1 on all 650).
    assert agreement >= 0.90, f"agreement {agreement:.1%}"
    assert top1_drop <= 5.0, f"top-1 drop {top1_drop:.1f} points"
    assert logit_sqnr_db(reference, quantized) > 15


def test_lite0_excluded_convs_stay_float(lite0):
    excluded = ["/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv"]
    path = lite0["folder"] / "excluded.onnx"
    summary = write_qdq_model(lite0["fp32"], lite0["amax"], path, exclude_nodes=excluded)
    graph = onnx.load(str(path)).graph
    for name in excluded:
        conv = next(n for n in graph.node if n.name == name)
        assert not any(is_dequantized(graph, i) for i in conv.input), name
    assert summary.excluded_nodes == tuple(excluded) and len(summary.quantized_nodes) == 47
    assert summary.activation_pairs == 47
    assert not {"input", "/relu6/Clip_output_0"} & {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
