"""Bias correction: each INT8 Conv's bias moved by the mean output shift its weight rounding causes.

Rounding a Conv's weights to INT8 (W -> Wq) changes its output by conv(x, Wq - W), whose mean over
images is not zero: per output channel it is a constant offset that every later layer inherits
(Nagel et al. 2019, "Data-Free Quantization", section 4.2; NNCF and AIMET ship it). The empirical
correction used here measures that mean on calibration images, through the FP32 model's own inputs of
each Conv and the Conv's real padding and strides, and subtracts it from the float bias of the Q/DQ
model: conv(x, Wq) + b - E[conv(x, Wq - W)] has the FP32 layer's mean output again.

The shifts depend only on the weights and the FP32 activations, never on the activation ranges, so
one set (`quantize/bias_correction.npz`) serves every Q/DQ model of a build: the gate's attempts, the
bundle's fallback variant, the report's calibration comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError

SHIFTS_FILE = "bias_correction.npz"
# Calibration images the shifts are measured on: a per-channel mean settles long before 512 images.
BIAS_CORRECTION_IMAGES = 128


def weight_rounding_shifts(fp32_onnx: str | os.PathLike, qdq_onnx: str | os.PathLike, batches: Sequence[np.ndarray],
                           threads: int | None = None) -> dict[str, np.ndarray]:
    """Per INT8 Conv of `qdq_onnx` (node name): E[conv(x, Wq - W)] per output channel, x the Conv's input
    in the FP32 model over `batches` (normalised NCHW float32)."""
    import onnx
    import torch

    from calibration.statistics import TensorReader
    from pipeline.stages.quantize.int8_weights import fp32_constants

    fp32, qdq = onnx.load(str(fp32_onnx)), onnx.load(str(qdq_onnx))
    fp32_weights = fp32_constants(fp32)  # Inception-ResNet's projection weights are Constant nodes
    convs = {node.name: node for node in fp32.graph.node if node.op_type == "Conv"}
    deltas = {name: delta for name, delta in _int8_weights(qdq, fp32_weights, convs).items() if delta.ndim == 4}
    if not deltas:
        return {}
    inputs = [convs[name].input[0] for name in deltas]
    reader = TensorReader(Path(fp32_onnx), list(dict.fromkeys(inputs)), threads)
    sums = {name: np.zeros(delta.shape[0], np.float64) for name, delta in deltas.items()}
    images = 0
    with torch.no_grad():
        for batch in batches:
            values = dict(zip(reader.names, reader.run(batch)))
            for name, delta in deltas.items():
                out = _conv(torch.from_numpy(values[convs[name].input[0]]), torch.from_numpy(delta), convs[name])
                sums[name] += out.double().mean(dim=(2, 3)).sum(dim=0).numpy()
            images += len(batch)
    if images == 0:
        raise PipelineError("bias correction: no calibration images")
    return {name: (total / images).astype(np.float32) for name, total in sums.items()}


def save_shifts(shifts: Mapping[str, np.ndarray], path: Path) -> None:
    from pipeline.cache import write_arrays_atomic

    write_arrays_atomic(path, dict(shifts))


def saved_shifts(quantize_folder: Path) -> dict[str, np.ndarray] | None:
    """The shifts the quantize stage saved in its folder; None when the build made no bias correction."""
    from pipeline.cache import read_arrays

    return read_arrays(Path(quantize_folder) / SHIFTS_FILE)


def _int8_weights(qdq, fp32_weights: dict, convs: dict) -> dict[str, np.ndarray]:
    """Wq - W of every Conv of the Q/DQ model whose weights come through an int8 DequantizeLinear."""
    from pipeline.stages.quantize.int8_weights import int8_conv_weights

    deltas = {}
    for name, (q, scale) in int8_conv_weights(qdq, convs).items():
        q = q.astype(np.float32)
        dequantized = q * scale.reshape((-1,) + (1,) * (q.ndim - 1)) if scale.ndim else q * scale
        deltas[name] = (dequantized - fp32_weights[convs[name].input[1]]).astype(np.float32)
    return deltas


def _conv(x, weight, node):
    """The ONNX Conv `node` (2-D) with `weight` and no bias, in torch: its pads, strides, dilations, groups."""
    import torch.nn.functional as F

    attributes = {a.name: a for a in node.attribute}

    def ints(name: str, default: list[int]) -> list[int]:
        return list(attributes[name].ints) if name in attributes else default

    if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"NOTSET", b""):
        raise PipelineError(f"bias correction: Conv {node.name} uses auto_pad, which the simplified graph never has")
    top, left, bottom, right = ints("pads", [0, 0, 0, 0])
    x = F.pad(x, (left, right, top, bottom))
    group = attributes["group"].i if "group" in attributes else 1
    return F.conv2d(x, weight, stride=ints("strides", [1, 1]), dilation=ints("dilations", [1, 1]), groups=group)


def apply_shifts(model, shifts: Mapping[str, np.ndarray], quantized: Sequence[str]) -> int:
    """Subtract each quantized Conv's shift from its float bias in `model` (a Q/DQ ModelProto), in place;
    Convs without a bias get one. Returns the number of Convs corrected."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    corrected = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in shifts or node.name not in set(quantized):
            continue
        shift = shifts[node.name]
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]])
            if readers[node.input[2]] == 1:  # its own bias: rewrite it in place
                initializers[node.input[2]].CopyFrom(numpy_helper.from_array(bias - shift, node.input[2]))
                corrected += 1
                continue
        else:
            bias = np.zeros_like(shift)
        name = f"{node.name}_corrected_bias"
        model.graph.initializer.append(numpy_helper.from_array((bias - shift).astype(np.float32), name))
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)
        corrected += 1
    return corrected
