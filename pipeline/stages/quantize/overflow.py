"""INT8 that cannot saturate on x86 CPUs without VNNI (`quantization.overflow_fix`, CPU target).

Such CPUs add each pair of neighbouring uint8 x int8 products into int16 (`targets.cpu_features`): a Conv
whose neighbouring inputs and weights are both large gets a clamped sum, and the IR computes something else
than the Q/DQ model says. Measured on EfficientNet-Lite0 (an AMD EPYC without VNNI, docs/results.md): the
logit SQNR of one Q/DQ model falls from 19.6 dB (its exact value: ONNX Runtime with graph optimizations off)
to 7.4 dB in ONNX Runtime and 6.1 dB in OpenVINO. Signed activations fare worse: the kernels shift them by
+128 into uint8, so every input counts as large.

An input is 0..255, never negative, so two products of weights of opposite signs cannot overflow; the sum
of a pair stays below 32767 when |q_i + q_j| <= 128 for every two weights a kernel may pair. So each
non-depthwise INT8 Conv gets, per output channel, the weight scale max(max|w| / 127, max|w_i + w_j| / 126)
over the neighbours of both orders the kernels lay weights out in: (in channel, kh, kw) and (kh, kw, in
channel). Where a channel's largest weight has small neighbours
the scale hardly changes; at worst it doubles (7-bit weights, what NNCF's `overflow_fix` and ONNX Runtime's
`reduce_range` use for every weight). 126 leaves AdaRound, which moves a weight by at most one step and
never across zero, room within 128. Activations keep their 8 bits. Depthwise Convs are left alone: both back ends compute them
product by product in int32.

`auto`, the default, turns this on when the build machine's CPU saturates, so the build's own checks see
what the IR computes. An IR built without it on a VNNI CPU is wrong on a CPU without VNNI; `verify` on such
a device fails and names the fix.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

INT8_MAX = 127
PAIR_LEVELS = 126  # nearest rounding: |q_i + q_j| <= 127; AdaRound's one step more: 128; 255 * 128 = 32640


def overflow_fix(config) -> bool:
    """`quantization.overflow_fix` resolved: only the CPU target (TensorRT's INT8 accumulates in int32), and
    `auto` by this machine's CPU."""
    from targets.cpu_features import int8_pairs_saturate

    choice = config.quantization.overflow_fix
    if config.target != "cpu" or choice == "disable":
        return False
    return choice == "enable" or int8_pairs_saturate()


def pair_safe_scales(weights: np.ndarray) -> np.ndarray:
    """Per output channel of Conv weights (O, I, kh, kw, or any spatial rank): the smallest symmetric scale at which every two
    neighbouring weights, in either layout, quantize to a sum of at most PAIR_LEVELS steps (only weights of
    one sign can add up: the inputs are never negative)."""
    w = np.asarray(weights, np.float32)
    channels = len(w)
    largest = np.abs(w).reshape(channels, -1).max(axis=1) / INT8_MAX
    for layout in (w, np.moveaxis(w, 1, -1)):  # (I, kh, kw) and (kh, kw, I) order
        flat = layout.reshape(channels, -1)
        if flat.shape[1] > 1:
            largest = np.maximum(largest, np.abs(flat[:, :-1] + flat[:, 1:]).max(axis=1) / PAIR_LEVELS)
    return np.where(largest > 0, largest, 1.0).astype(np.float32)


def make_saturation_safe(model, fp32_weights: Mapping[str, np.ndarray], quantized: Sequence[str]) -> int:
    """Requantize the int8 weights of each non-depthwise Conv of `quantized` in a Q/DQ model (in place) with
    `pair_safe_scales` of its float weights (`fp32_weights`, by node name); returns the number of Convs whose
    scales changed."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    dequantize = {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    wanted, changed = set(quantized), 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in wanted or _depthwise(node, fp32_weights[node.name]):
            continue
        weight = dequantize.get(node.input[1])
        if weight is None or weight.input[0] not in initializers:
            continue
        w = np.asarray(fp32_weights[node.name], np.float32)
        scale = pair_safe_scales(w)
        if np.allclose(scale, numpy_helper.to_array(initializers[weight.input[1]]), rtol=1e-6):
            continue
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -INT8_MAX, INT8_MAX).astype(np.int8)
        initializers[weight.input[0]].CopyFrom(numpy_helper.from_array(q, weight.input[0]))
        initializers[weight.input[1]].CopyFrom(numpy_helper.from_array(scale, weight.input[1]))
        changed += 1
    return changed


def _depthwise(node, weights: np.ndarray) -> bool:
    """One input channel per group: computed product by product, no pairs."""
    group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
    return group > 1 and np.shape(weights)[1] == 1


def host_int8_saturates_tensorrt_model(config) -> bool:
    """A GPU target's signed, full-range Q/DQ ONNX judged on a CPU without VNNI: the host's INT8 kernels would
    saturate sums that TensorRT (int32 accumulation) computes right, so the host judges it in ONNX Runtime's
    exact arithmetic and not in OpenVINO (measured on Lite0: 1.5 dB in the kernels, 19.2 dB exact)."""
    from targets.cpu_features import int8_pairs_saturate

    return config.target != "cpu" and int8_pairs_saturate()
