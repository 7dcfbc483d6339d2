"""INT8 Q/DQ ONNX (explicit quantization) from precomputed activation ranges.

The model this writes is what TensorRT builds an INT8 engine from, and what ONNX Runtime runs on the
CPU to measure INT8 accuracy before any GPU is involved.

Numerics (TensorRT's only INT8 scheme; ONNX Runtime's defaults, asymmetric QUInt8, break it):
- activations: INT8, per tensor, symmetric, zero point 0, scale = amax / 127; on the CPU target the
  never-negative ones (after a Relu or ReLU6) UINT8, zero point 0, scale = amax / 255
  (`pipeline.stages.quantize.unsigned`, `quantization.unsigned_activations`);
- weights: INT8, per output channel (axis 0), symmetric, zero point 0, scale = max|w[c]| / 127,
  stored as int8 initializers behind a DequantizeLinear (no QuantizeLinear);
- biases stay float (TensorRT has no INT32 Q/DQ and adds the bias in float inside the fused kernel).

Placement (the way TensorRT fuses, as NVIDIA Model Optimizer places them):
- every Conv gets Q/DQ on its activation input and its weights; its output stays float, so the
  Conv -> Clip/Relu -> Q of the next layer fuses into one INT8 kernel;
- one Q/DQ pair per tensor, shared by every Conv that reads it (a Concat output feeding four
  branches is quantized once, and all four branches see the same INT8 values);
- MaxPool / AveragePool read the dequantized tensor when their input already has a pair for a
  Conv (no extra pair, no extra calibration range), as NVIDIA's pytorch-quantization quantizes
  pool inputs: TensorRT can then move the DQ past the pool and run it in INT8 instead of in float
  between two INT8 convs (Inception's pool branches read the same Concat output as the conv
  branches). The pool then sees the INT8-rounded values that the convs beside it already see.
  A pool whose input feeds no Conv gets no pair;
- every other consumer reads the float tensor: the residual Add (both of its inputs), the global
  pooling, Flatten, the Gemm/MatMul head and the logits stay float. In particular a Conv's output
  never carries Q/DQ, so the conv branch of a residual Add does not (Model Optimizer's rule), and
  the skip branch keeps full precision too (the residual stream does not pick up rounding noise
  block after block). Model Optimizer instead lets the skip input read the pair it shares with
  the next block's convs, so that TensorRT can fuse the Add into the conv with an INT8 residual;
  on EfficientNet-Lite0 (minmax, 650 val images) that gave 98.0% top-1 agreement against 98.8%
  with the skip in float (`_restore_float_consumers` decides which readers keep the pair);
  `quantization.residual_adds` switches to that placement (`pipeline.stages.quantize.residual`);
- `quantization.int8_head` quantizes the global pool's input and the Gemm/MatMul head as NNCF does
  (`pipeline.stages.quantize.head`);
- `exclude_nodes` leave those Convs in float: they read the float tensor and float weights.

ONNX Runtime's `QDQQuantizer` writes the Q/DQ nodes; it rewires *every* consumer of a quantized
tensor to the dequantized copy, so a pass afterwards gives the float tensor back to everything
that is not a quantized Conv or a pool. It quantizes only weights stored as initializers, so
Constant nodes (onnxsim leaves them for Inception-ResNet's residual projections, whose weights
have the residual scale folded in) become initializers first: same values, same names. The model is prepared as `quantize_static` prepares it
(ONNX shape inference, opset check) and is not simplified or constant-folded afterwards: that
would fold the weight DequantizeLinear nodes away and TensorRT would lose INT8 on those layers.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import onnx

QUANTIZED_OP = "Conv"
POOL_OPS = ("MaxPool", "AveragePool")  # read the shared dequantized tensor (see the module docs)


@dataclass(frozen=True)
class QdqSummary:
    """What `write_qdq_model` did, for the stage manifest."""

    quantized_nodes: tuple[str, ...]  # Convs with INT8 input and weights
    excluded_nodes: tuple[str, ...]  # Convs left in float on request
    activation_pairs: int  # Q/DQ pairs on activations (one per quantized tensor)
    weight_dequantize: int  # int8 weight initializers behind a DequantizeLinear
    unsigned_pairs: int = 0  # of those, pairs on never-negative tensors in uint8 (zero point 0, scale = amax/255)
    overflow_fix_convs: int | None = None  # Convs whose weight scales `overflow_fix` widened (None: off)
    int8_heads: int = 0  # fully-connected layers in INT8 (`int8_head`), their global pool's input too
    activation_type: str = "int8 per-tensor symmetric (zero point 0, scale = amax/127)"
    weight_type: str = "int8 per-channel symmetric (axis 0, zero point 0)"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["quantized_nodes"] = list(self.quantized_nodes)
        out["excluded_nodes"] = list(self.excluded_nodes)
        return out


def quantized_activations(
    model: "onnx.ModelProto | str | os.PathLike", exclude_nodes: Sequence[str] = (), residual_adds: bool = False,
    int8_head: bool = False,
) -> list[str]:
    """The activation tensors that carry Q/DQ under our placement, in graph order.

    These are the inputs of the quantized Convs, with `residual_adds` the Conv outputs that residual
    Adds read (`pipeline.stages.quantize.residual`), and with `int8_head` the inputs of the global pool and
    the fully-connected head (`pipeline.stages.quantize.head`): the calibration table must give a range for each.
    """
    graph = _load(model).graph
    _check_excluded(graph, exclude_nodes)
    excluded = set(exclude_nodes)
    names: dict[str, None] = {}  # an ordered set
    convs = [node for node in _quantizable_convs(graph) if node.name not in excluded]
    for node in convs:
        names[node.input[0]] = None
    if residual_adds:
        from pipeline.stages.quantize.residual import residual_pairs

        for _, conv_out, _ in residual_pairs(graph, {node.name for node in convs}, set(names)):
            names[conv_out] = None
    if int8_head:
        from pipeline.stages.quantize.head import head_tensors

        names.update(dict.fromkeys(head_tensors(graph)))
    return list(names)


def write_qdq_model(
    fp32_onnx_path: str | os.PathLike,
    amax: Mapping[str, float],
    output_path: str | os.PathLike,
    exclude_nodes: Sequence[str] = (),
    bias_shifts: Mapping[str, np.ndarray] | None = None,
    residual_adds: bool = False,
    unsigned: bool = False,
    weight_rounding: Mapping[str, np.ndarray] | None = None,
    overflow_fix: bool = False,
    int8_head: bool = False,
) -> QdqSummary:
    """Write the INT8 Q/DQ model of a (simplified) FP32 ONNX, activation ranges given as amax.

    `amax` maps each tensor of `quantized_activations(...)` to its calibrated absolute maximum
    (extra entries are ignored). `exclude_nodes` names Convs to keep in float (fallback).
    `bias_shifts` (from `pipeline.stages.quantize.bias`): the bias correction of each INT8 Conv.
    `residual_adds`: residual Adds read both inputs through Q/DQ (`pipeline.stages.quantize.residual`).
    `unsigned`: never-negative activations as UINT8 (`pipeline.stages.quantize.unsigned`; not for TensorRT).
    `weight_rounding` (from `pipeline.stages.quantize.adaround`): AdaRound's int8 weights of each INT8 Conv,
    in place of nearest rounding (the shifts of `bias_shifts` must have been measured with them).
    `overflow_fix`: no Conv can saturate on x86 CPUs without VNNI (`pipeline.stages.quantize.overflow`: wider
    weight scales where neighbouring weights are large); AdaRound's weights and the shifts must then have been
    measured on a model written with it too.
    `int8_head`: the global pool and the Gemm / MatMul head in INT8 too (`pipeline.stages.quantize.head`).
    """
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer, update_opset_version

    fp32_onnx_path, output_path = Path(fp32_onnx_path), Path(output_path)
    if not fp32_onnx_path.is_file():
        raise PipelineError(f"ONNX model not found: {fp32_onnx_path}")
    exclude_nodes = tuple(dict.fromkeys(exclude_nodes))

    # The preparation quantize_static does: shape inference (the quantizer needs every tensor's
    # type) and an opset check (INT8 per-channel needs opset >= 13; ours are 17).
    model = load_model_with_shape_infer(fp32_onnx_path)
    model = update_opset_version(model, QuantType.QInt8, QuantType.QInt8)
    _constants_to_initializers(model.graph)
    tensors = quantized_activations(model, exclude_nodes)
    quantized = [n.name for n in _quantizable_convs(model.graph) if n.name not in set(exclude_nodes)]
    fp32_weights = _conv_weights(model.graph, quantized) if overflow_fix else {}
    pairs = []
    if residual_adds:
        from pipeline.stages.quantize.residual import place_residual_pairs, residual_pairs

        pairs = residual_pairs(model.graph, set(quantized), set(tensors))
        _checked_amax(amax, [conv_out for _, conv_out, _ in pairs])
    if int8_head:
        from pipeline.stages.quantize.head import head_tensors

        _checked_amax(amax, head_tensors(model.graph))
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(-value), highest=np.float32(value))
        for name, value in _checked_amax(amax, tensors).items()
    })

    quantizer = QDQQuantizer(
        model,
        True,  # per_channel
        False,  # reduce_range: TensorRT uses the full INT8 range
        QuantType.QInt8,  # weights
        QuantType.QInt8,  # activations
        ranges,
        quantized,  # nodes_to_quantize
        list(exclude_nodes),
        [QUANTIZED_OP],
        {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,  # float bias, see the module docs
            "OpTypesToExcludeOutputQuantization": [QUANTIZED_OP],  # no Q/DQ on Conv outputs
            "DedicatedQDQPair": False,  # one pair per tensor, shared by its Convs
        },
    )
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" warning
    try:
        qdq = quantizer.quantize_model()
    finally:
        root_logger.setLevel(level)
    _restore_float_consumers(qdq.graph, set(quantized))
    if pairs:
        place_residual_pairs(qdq, pairs, amax)
    heads = 0
    if int8_head:  # before make_unsigned, which turns its pairs on never-negative tensors UINT8 too
        from pipeline.stages.quantize.head import place_head_pairs

        heads = place_head_pairs(qdq, amax, pair_safe=overflow_fix)
    # The quantizer and the placements append their nodes at the end; what follows reads the graph in order.
    quantizer.model.topological_sort()
    unsigned_pairs = 0
    if unsigned:
        from pipeline.stages.quantize.unsigned import make_unsigned

        unsigned_pairs = make_unsigned(qdq, amax)
    overflow = None
    if overflow_fix:  # before AdaRound, which rounds around the weights that will run
        from pipeline.stages.quantize.overflow import make_saturation_safe

        overflow = make_saturation_safe(qdq, fp32_weights, quantized)
    if weight_rounding:
        from pipeline.stages.quantize.adaround import apply_rounding

        apply_rounding(qdq, weight_rounding, quantized)
    if bias_shifts:
        from pipeline.stages.quantize.bias import apply_shifts

        apply_shifts(qdq, bias_shifts, quantized)
    _drop_metadata(qdq, "onnx.infer")  # added by the shape-inference helper; not ours to ship

    onnx.checker.check_model(qdq)
    save_model_atomically(qdq, output_path)
    placement = describe_placement(qdq)
    return QdqSummary(
        quantized_nodes=tuple(quantized),
        excluded_nodes=exclude_nodes,
        activation_pairs=placement["activation_pairs"],
        weight_dequantize=placement["weight_dequantize"],
        unsigned_pairs=unsigned_pairs,
        overflow_fix_convs=overflow,
        int8_heads=heads,
        **({"activation_type": QdqSummary.activation_type + "; uint8 on never-negative tensors "
            "(zero point 0, scale = amax/255)"} if unsigned_pairs else {}),
    )


def describe_placement(qdq_model: "onnx.ModelProto | str | os.PathLike") -> dict:
    """Facts about where the Q/DQ nodes sit and what types they use (README, tests, manifest)."""
    from onnx import numpy_helper

    graph = _load(qdq_model).graph
    initializers = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}

    activation_q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    activation_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in initializers]

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    zero_points = [array(n.input[2]) for n in activation_q + weight_dq + activation_dq if len(n.input) > 2]
    per_channel = all(
        _axis(n) == 0 and array(n.input[1]).shape == (array(n.input[0]).shape[0],) for n in weight_dq
    )
    dq_outputs = {n.output[0] for n in activation_dq}
    dequantized_inputs = {  # op type -> how many of its inputs read an activation DequantizeLinear
        op: sum(1 for n in graph.node if n.op_type == op for i in n.input if i in dq_outputs)
        for op in ("Add", "Gemm", "MatMul", "GlobalAveragePool", "Concat")
    }
    return {
        "activation_pairs": len(activation_q),
        "weight_dequantize": len(weight_dq),
        "activation_dq_consumers": dict(Counter(c.op_type for o in dq_outputs for c in consumers.get(o, []))),
        "weight_dq_consumers": dict(Counter(c.op_type for n in weight_dq for c in consumers.get(n.output[0], []))),
        "dequantized_inputs_of": dequantized_inputs,
        "add_input_quantized": dequantized_inputs["Add"] > 0,
        "gemm_input_quantized": dequantized_inputs["Gemm"] + dequantized_inputs["MatMul"] > 0,
        "graph_output_quantized": any(
            n.output[0] in outputs for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        ),
        "weight_scales_per_channel": per_channel,
        "zero_points_all_zero": all(not np.any(z) for z in zero_points),
        "zero_point_dtypes": sorted({str(z.dtype) for z in zero_points}),
        "weight_dtypes": sorted({str(array(n.input[0]).dtype) for n in weight_dq}),
        "bias_quantized": any(
            c.op_type == "Conv" and len(c.input) > 2 and c.input[2] in {n.output[0] for n in weight_dq}
            for c in graph.node
        ),
    }


# ---------------------------------------------------------------------------- helpers


def _conv_weights(graph, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The float weights of the Convs `names`, by node name (before the quantizer replaces them)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    wanted = set(names)
    return {node.name: numpy_helper.to_array(initializers[node.input[1]])
            for node in graph.node if node.op_type == QUANTIZED_OP and node.name in wanted}


def _quantizable_convs(graph) -> list:
    """Convs with constant weights (the only ones an INT8 kernel can take)."""
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in _constant_nodes(graph)}
    return [n for n in graph.node if n.op_type == QUANTIZED_OP and len(n.input) > 1 and n.input[1] in constants]


def _constant_nodes(graph) -> list:
    """Constant nodes holding a tensor (onnxsim leaves some: Inception-ResNet's residual projections
    get their weights, with the residual scale folded in, from Constant nodes)."""
    outputs = {o.name for o in graph.output}
    return [
        n for n in graph.node
        if n.op_type == "Constant" and n.output[0] not in outputs and [a.name for a in n.attribute] == ["value"]
    ]


def _constants_to_initializers(graph) -> None:
    """ONNX Runtime's quantizer only quantizes weights that are initializers: move Constant
    tensors there (the same values under the same names)."""
    for node in _constant_nodes(graph):
        tensor = node.attribute[0].t
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)


def _check_excluded(graph, exclude_nodes: Sequence[str]) -> None:
    convs = {n.name for n in _quantizable_convs(graph)}
    unknown = [name for name in exclude_nodes if name not in convs]
    if unknown:
        raise PipelineError(
            f"cannot keep {unknown[:3]} in float: not a Conv of this model "
            "(exclude_nodes takes Conv node names of the simplified ONNX)"
        )


def _checked_amax(amax: Mapping[str, float], tensors: Sequence[str]) -> dict[str, float]:
    missing = [name for name in tensors if name not in amax]
    if missing:
        raise PipelineError(
            f"the calibration table has no range for {len(missing)} quantized tensors "
            f"(first: {missing[:3]}): calibrate this exact ONNX again"
        )
    bad = {name: amax[name] for name in tensors if not (math.isfinite(amax[name]) and amax[name] > 0)}
    if bad:
        first = dict(list(bad.items())[:3])
        raise PipelineError(f"calibration ranges must be finite and positive, got {first}: recalibrate")
    return {name: float(amax[name]) for name in tensors}


def _restore_float_consumers(graph, quantized_convs: set[str]) -> None:
    """Give the float tensor back to every reader of a dequantized activation that is not a
    quantized Conv or a pool (ONNX Runtime rewires all of them)."""
    quantized_from = {q.output[0]: q.input[0] for q in graph.node if q.op_type == "QuantizeLinear"}
    float_source = {  # DequantizeLinear output -> the float tensor its QuantizeLinear reads
        dq.output[0]: quantized_from[dq.input[0]]
        for dq in graph.node if dq.op_type == "DequantizeLinear" and dq.input[0] in quantized_from
    }
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        keeps_int8 = node.name in quantized_convs or node.op_type in POOL_OPS
        for index, name in enumerate(node.input):
            if name in float_source and not keeps_int8:
                node.input[index] = float_source[name]


def _consumers(graph) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _drop_metadata(model, key: str) -> None:
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def _load(model) -> "onnx.ModelProto":
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise PipelineError(f"ONNX model not found: {path}")
    return onnx.load(str(path))


def save_model_atomically(model, path: Path) -> None:
    """onnx.save to a temporary file in the same folder, then rename: never a half-written model."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        onnx.save(model, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
