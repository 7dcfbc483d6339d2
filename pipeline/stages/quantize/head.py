"""The classifier head in INT8 (`quantization.int8_head`, off by default), the way NNCF places it.

Our default keeps the global pooling and the fully-connected head in float: the logits then collect no
rounding of their own. NNCF quantizes both: the global pool reads its input through a pair (OpenVINO then
has the last Conv write u8 and pools in u8), and the Gemm / MatMul reads its input through a pair and takes
int8 weights, per output channel. With this option our Q/DQ model does the same, from the same calibration
table (the calibrate stage then also ranges the pool's input and the head's input). On EfficientNet-Lite0
the float head was one of the two differences between our IR and NNCF's, the float residual Adds the other
(`quantization.residual_adds`; docs/results.md).

A head is a Gemm (not transposing its input) or a MatMul whose second input is a 2-D constant: every
fully-connected layer of the graph. Its weights are written here rather than by ONNX Runtime's quantizer,
which sets a Gemm's beta to 1 when it leaves the bias in float. The pool is a GlobalAveragePool or ReduceMean
whose output reaches the head through Flatten / Reshape / Squeeze alone. The gate's fallback returns Convs
to float, never the head: a head that costs too much is this option turned off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

HEAD_OPS = ("Gemm", "MatMul")
GLOBAL_POOLS = ("GlobalAveragePool", "ReduceMean")
SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze")
INT8_MAX = 127


@dataclass(frozen=True)
class Head:
    node: str  # the Gemm / MatMul
    input: str  # its activation input
    weight: str  # its 2-D constant weight
    axis: int  # the weight's output-channel axis (0: Gemm with transB, else 1)
    pooled: str | None  # the input of the global pool that feeds it, if one does


def head_layers(graph) -> list[Head]:
    """The fully-connected layers of `graph` with constant 2-D weights, and the global pool before each."""
    from onnx import helper

    # The rank of each constant: initializers, and Constant nodes (which `write_qdq_model` makes initializers).
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    ranks.update({node.output[0]: len(node.attribute[0].t.dims) for node in graph.node
                  if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]})
    producers = {out: node for node in graph.node for out in node.output}
    heads = []
    for node in graph.node:
        if node.op_type not in HEAD_OPS or len(node.input) < 2 or ranks.get(node.input[1]) != 2:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transA", 0):
            continue
        axis = 0 if node.op_type == "Gemm" and attributes.get("transB", 0) else 1
        source = producers.get(node.input[0])
        while source is not None and source.op_type in SHAPE_ONLY:
            source = producers.get(source.input[0])
        pooled = source.input[0] if source is not None and source.op_type in GLOBAL_POOLS else None
        heads.append(Head(node.name, node.input[0], node.input[1], axis, pooled))
    return heads


def head_tensors(graph) -> list[str]:
    """The activation tensors the head placement quantizes (each needs a calibrated range)."""
    names: dict[str, None] = {}
    for head in head_layers(graph):
        if head.pooled:
            names[head.pooled] = None
        names[head.input] = None
    return list(names)


def head_weight_scales(weights: np.ndarray, axis: int, pair_safe: bool) -> np.ndarray:
    """Per output channel: max|w| / 127, or with `pair_safe` (`quantization.overflow_fix`) the scale at which
    no two neighbouring inputs' products can saturate (`pipeline.stages.quantize.overflow`)."""
    from pipeline.stages.quantize.overflow import pair_safe_scales

    by_output = np.moveaxis(np.asarray(weights, np.float32), axis, 0)  # (out, in): neighbours along `in`
    if pair_safe:
        return pair_safe_scales(by_output)
    largest = np.abs(by_output).max(axis=1) / INT8_MAX
    return np.where(largest > 0, largest, 1.0).astype(np.float32)


def place_head_pairs(model, amax: Mapping[str, float], pair_safe: bool = False) -> int:
    """Quantize each head of `model` (a Q/DQ model, in place): its pool and its own input read their tensors
    through a pair (the one a tensor already has, else a new symmetric INT8 pair, scale amax / 127, that
    `make_unsigned` may turn UINT8 afterwards), and its weights become int8 behind a DequantizeLinear.
    Returns the number of heads."""
    from onnx import helper, numpy_helper

    from pipeline.stages.quantize.pairs import add_pair, dequantized_outputs

    graph = model.graph
    heads = head_layers(graph)
    dequantized = dequantized_outputs(graph)
    nodes = {node.name: node for node in graph.node}
    initializers = {init.name: init for init in graph.initializer}

    def pair_of(tensor: str) -> str:  # the tensor's own pair, or a new one
        if tensor not in dequantized:
            dequantized[tensor] = add_pair(graph, tensor, amax[tensor], "head")
        return dequantized[tensor]

    for head in heads:
        if head.pooled:
            pool = next(node for node in graph.node
                        if node.op_type in GLOBAL_POOLS and node.input[0] == head.pooled)
            pool.input[0] = pair_of(head.pooled)
        node = nodes[head.node]
        node.input[0] = pair_of(head.input)
        weights = numpy_helper.to_array(initializers[head.weight]).astype(np.float32)
        scale = head_weight_scales(weights, head.axis, pair_safe)
        shape = [1, 1]
        shape[head.axis] = -1
        q = np.clip(np.round(weights / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
        names = (f"{head.weight}_int8", f"{head.weight}_int8_scale", f"{head.weight}_int8_zero_point")
        graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                                  numpy_helper.from_array(np.zeros(len(scale), np.int8), names[2])])
        graph.node.append(helper.make_node("DequantizeLinear", list(names), [f"{head.weight}_DequantizeLinear_Output"],
                                           name=f"{head.weight}_DequantizeLinear", axis=head.axis))
        node.input[1] = f"{head.weight}_DequantizeLinear_Output"
    used = {name for node in graph.node for name in node.input}
    unused = {head.weight for head in heads} - used  # the float head weights nothing reads any more
    kept = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(heads)
