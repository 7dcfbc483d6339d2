"""Unsigned INT8 for activations that are never negative, where the back ends allow it (the CPU target).

A tensor made by a Relu, or by a Clip whose minimum is 0 (ReLU6), has no negative value, so a symmetric
INT8 pair (-127..127, scale amax/127) leaves half of its levels unused. As UINT8 with zero point 0 and
scale amax/255 it keeps the calibrated range [0, amax] and gets 255 levels in it: half the rounding step,
from the same calibration table. Non-negativity carries through the ops that cannot make a value negative
from non-negative inputs (Concat, the pools, Pad with 0, reshapes): Inception's Concat outputs qualify.
This is OpenVINO's own choice for such tensors (NNCF quantizes them to u8).

TensorRT takes only signed INT8 Q/DQ on the GPU (its ONNX parser accepts UINT8 and asymmetric Q/DQ for DLA
only, `OnnxParserFlag.ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA` in TensorRT 11.1), so the GPU targets
keep INT8 everywhere: `unsigned_activations(config)` is the one place that decides.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

UINT8_MAX = 255
# Ops whose output is >= 0 wherever their data inputs are (Pad only in constant mode with a zero value; a Q/DQ
# pair only with zero point 0, as all of ours: a pool or a head that reads a pair then keeps the sign).
_KEEP_SIGN = {"Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Reshape",
              "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Pad", "QuantizeLinear", "DequantizeLinear"}


def unsigned_activations(config) -> bool:
    """`quantization.unsigned_activations`, on the target whose back ends run UINT8 Q/DQ (CPU: OpenVINO, ONNX
    Runtime); a GPU target's Q/DQ ONNX is TensorRT's input and stays signed."""
    return config.quantization.unsigned_activations and config.target == "cpu"


def nonnegative_tensors(graph) -> set[str]:
    """Tensors of `graph` (topologically sorted) that no input can make negative."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    nonnegative: set[str] = set()
    for node in graph.node:
        # The tensors that carry values: every input of a Concat, else the first (not a shape, axes or pads).
        data = [name for name in (node.input if node.op_type == "Concat" else node.input[:1]) if name]
        if node.op_type == "Relu":
            nonnegative.add(node.output[0])
        elif node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in constants \
                and float(constants[node.input[1]]) >= 0:
            nonnegative.add(node.output[0])
        elif node.op_type in _KEEP_SIGN and data and all(name in nonnegative for name in data):
            if node.op_type == "Pad" and not _pads_with_zero(node, constants):
                continue
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not _zero_point_zero(node, constants):
                continue
            nonnegative.update(node.output[:1])
    return nonnegative


def _pads_with_zero(node, constants: Mapping[str, np.ndarray]) -> bool:
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    value = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return mode == "constant" and (value is None or (value in constants and float(constants[value]) == 0.0))


def _zero_point_zero(node, constants: Mapping[str, np.ndarray]) -> bool:
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return zero is None or (zero in constants and not np.any(constants[zero]))


def make_unsigned(model, amax: Mapping[str, float]) -> int:
    """Turn each activation Q/DQ pair that reads a never-negative tensor into UINT8, zero point 0, scale
    amax/255 (same range, twice the levels); returns how many pairs changed."""
    from onnx import numpy_helper

    graph = model.graph
    nonnegative = nonnegative_tensors(graph)
    readers: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], []).append(node)
    changed, replaced = 0, set()
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in nonnegative:
            continue
        tensor = node.input[0]
        scale = numpy_helper.from_array(np.float32(amax[tensor] / UINT8_MAX), f"{tensor}_uint8_scale")
        zero = numpy_helper.from_array(np.uint8(0), f"{tensor}_uint8_zero_point")
        graph.initializer.extend([scale, zero])
        for quantizer in (node, *readers.get(node.output[0], [])):
            replaced.update(quantizer.input[1:3])
            quantizer.input[1], quantizer.input[2] = scale.name, zero.name
        changed += 1
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in replaced]
    del graph.initializer[:]  # the int8 scales and zero points no pair reads any more
    graph.initializer.extend(kept)
    return changed
