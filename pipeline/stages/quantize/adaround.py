"""AdaRound: each INT8 Conv's weights rounded up or down to minimise its output error, not to the nearest step.

Nearest rounding minimises the error of each weight, not of the layer's output. AdaRound (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization") learns, per weight, whether to round down or
up: W~ = s * clip(floor(W/s) + h(V), -127, 127) with the rectified sigmoid h(V) = clip(sigmoid(V)(zeta - gamma)
+ gamma, 0, 1), minimising ||f(conv(x, W~) + b) - f(conv(x, W) + b)||^2 + lambda * sum(1 - |2h(V) - 1|^beta),
f the Conv's own Relu/Clip when it has one, beta annealed from 20 to 2 after a warm-up without the regulariser
(the paper's section 4, AIMET's defaults: lambda 0.01, 20% warm-up, cosine annealing). At the end h(V) is
rounded to 0 or 1: every weight moves at most one step from nearest rounding.

x is each Conv's input in the FP32 model on calibration images (as bias correction reads it), so one set of
weights, independent of the activation ranges, serves every Q/DQ model of a build; the per-channel scales s are
the ones the Q/DQ model uses (max|w|/127), unchanged. (Feeding each Conv its input rounded by its own activation
Q/DQ instead, so that the weights make up for it, measured 0.5 dB worse on Lite0: docs/results.md.) To stay fast on a small CPU the loss is computed on
sampled output positions (im2col patches: every Conv becomes one batched matmul), not on whole images. A layer
whose learnt rounding reconstructs its sampled outputs worse than nearest rounding keeps nearest rounding.
The weights are kept as `quantize/adaround.npz` (int8 per Conv node): the gate's attempts, the bundle's
fallback variant and the report's calibration comparison reuse them; bias correction is then measured with them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError

ROUNDING_FILE = "adaround.npz"
ADAROUND_IMAGES = 128  # calibration images whose Conv inputs are sampled
POSITIONS_PER_IMAGE = 32  # output positions sampled per image and Conv (4,096 samples per Conv)
ITERATIONS = 800  # Adam steps per Conv (the paper: 10k-20k on a GPU; 400 measured 0.2 dB lower on Lite0)
BATCH = 256  # samples per step
LEARNING_RATE = 1e-2
REGULARISATION = 0.01  # lambda
BETA = (20.0, 2.0)  # annealed from/to
WARM_UP = 0.2  # fraction of the steps without the rounding regulariser
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
QMIN, QMAX = -127, 127  # symmetric INT8 weights: scale = max|w|/127 never needs -128
# Conv inputs read per pass of the FP32 model: bounds the memory of the sampled patches.
CONVS_PER_PASS = 16


@dataclass
class LayerResult:
    weights: np.ndarray  # int8, the Conv's weight shape
    changed: float  # fraction of weights rounded the other way than nearest
    error_nearest: float  # mean squared output error on the layer's samples, nearest rounding
    error_adaround: float  # the same with the learnt rounding (nearest's when it did not do better)


def adaround_weights(fp32_onnx: str | os.PathLike, qdq_onnx: str | os.PathLike, batches: Sequence[np.ndarray],
                     threads: int | None = None, iterations: int = ITERATIONS, positions: int = POSITIONS_PER_IMAGE,
                     seed: int = 0, only: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Learnt INT8 weights of every INT8 Conv of `qdq_onnx` (node name -> int8 array), and facts about the run.

    `batches`: normalised NCHW float32 calibration images; `only`: restrict to these Conv node names."""
    import onnx
    import torch

    from calibration.statistics import TensorReader

    started = time.perf_counter()
    fp32, qdq = onnx.load(str(fp32_onnx)), onnx.load(str(qdq_onnx))
    layers = _int8_layers(qdq, fp32)
    if only is not None:
        layers = {name: layer for name, layer in layers.items() if name in set(only)}
    if not layers:
        return {}, {"layers": 0}
    if threads:
        torch.set_num_threads(threads)
    generator = np.random.default_rng(seed)
    names = list(layers)
    results: dict[str, LayerResult] = {}
    for start in range(0, len(names), CONVS_PER_PASS):
        chunk = names[start:start + CONVS_PER_PASS]
        reader = TensorReader(Path(fp32_onnx), list(dict.fromkeys(layers[n]["node"].input[0] for n in chunk)), threads)
        patches: dict[str, list] = {name: [] for name in chunk}
        targets: dict[str, list] = {name: [] for name in chunk}
        for batch in batches:
            values = dict(zip(reader.names, reader.run(batch)))
            for name in chunk:
                sampled, target = _sample_patches(values[layers[name]["node"].input[0]], layers[name], positions, generator)
                patches[name].append(sampled)
                targets[name].append(target)
        for name in chunk:
            samples = torch.from_numpy(np.concatenate(patches.pop(name)))
            target = torch.from_numpy(np.concatenate(targets.pop(name)))
            results[name] = _optimise(layers[name], samples, target, iterations, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - started
    facts = {
        "layers": len(results), "iterations": iterations, "samples_per_layer": positions * sum(len(b) for b in batches),
        "images": sum(len(b) for b in batches), "seconds": round(seconds, 1),
        "kept_nearest": sorted(n for n, r in results.items() if r.error_adaround >= r.error_nearest),
        "weights_changed": round(float(np.mean([r.changed for r in results.values()])), 4),
        "output_mse_ratio": {n: round(r.error_adaround / r.error_nearest, 4) if r.error_nearest else 1.0
                             for n, r in results.items()},
    }
    return {name: r.weights for name, r in results.items()}, facts


def save_rounding(rounding: Mapping[str, np.ndarray], path: Path) -> None:
    from pipeline.cache import write_arrays_atomic

    write_arrays_atomic(path, dict(rounding))


def saved_rounding(quantize_folder: Path) -> dict[str, np.ndarray] | None:
    """The AdaRound weights the quantize stage saved in its folder; None when the build made none."""
    from pipeline.cache import read_arrays

    return read_arrays(Path(quantize_folder) / ROUNDING_FILE)


def apply_rounding(model, rounding: Mapping[str, np.ndarray], quantized: Sequence[str]) -> int:
    """Replace the int8 weight initializer of each quantized Conv named in `rounding` (a Q/DQ ModelProto, in
    place). Returns the number of Convs rewritten."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    dequantize = {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}
    wanted = set(quantized)
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in rounding or node.name not in wanted:
            continue
        dq = dequantize.get(node.input[1])
        if dq is None or dq.input[0] not in initializers:
            continue
        current = numpy_helper.to_array(initializers[dq.input[0]])
        weights = np.asarray(rounding[node.name])
        if weights.shape != current.shape or current.dtype != np.int8:
            raise PipelineError(f"AdaRound weights of {node.name} have shape {weights.shape}, the Q/DQ model's "
                                f"{current.shape} ({current.dtype}): quantize again (quantize/{ROUNDING_FILE} is stale)")
        if np.abs(weights.astype(np.int32) - current.astype(np.int32)).max(initial=0) > 1:
            raise PipelineError(f"AdaRound weights of {node.name} are more than one step from nearest rounding: "
                                f"quantize/{ROUNDING_FILE} belongs to other weights")
        initializers[dq.input[0]].CopyFrom(numpy_helper.from_array(weights.astype(np.int8), dq.input[0]))
        rewritten += 1
    return rewritten


# ---------------------------------------------------------------------------- helpers


def _int8_layers(qdq, fp32) -> dict[str, dict]:
    """Per INT8 Conv (weights behind an int8 DequantizeLinear): FP32 weights and bias, the per-channel scale,
    the nearest int8 weights, the Conv node, its activation (Relu/Clip when it is the output's only reader)."""
    from pipeline.stages.quantize.int8_weights import fp32_constants, int8_conv_weights

    fp32_init = fp32_constants(fp32)  # Clip bounds and Inception-ResNet's projection weights are Constant nodes
    convs = {node.name: node for node in fp32.graph.node if node.op_type == "Conv"}
    readers: dict[str, list] = {}
    for node in fp32.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in fp32.graph.output}
    layers = {}
    for name, (q, scale) in int8_conv_weights(qdq, convs).items():
        if q.dtype != np.int8 or q.ndim != 4:
            continue
        fp = convs[name]
        weight = fp32_init[fp.input[1]].astype(np.float32)
        scale = scale.reshape(-1)
        if scale.size == 1:
            scale = np.full(weight.shape[0], scale[0], np.float32)
        bias = fp32_init[fp.input[2]].astype(np.float32) if len(fp.input) > 2 and fp.input[2] else \
            np.zeros(weight.shape[0], np.float32)
        consumers = readers.get(fp.output[0], [])
        activation = None
        if len(consumers) == 1 and fp.output[0] not in graph_outputs and consumers[0].op_type in ("Relu", "Clip"):
            activation = _clip_bounds(consumers[0], fp32_init)
            if all(math.isinf(bound) for bound in activation):
                activation = None
        layers[name] = {"node": fp, "weight": weight, "scale": scale, "bias": bias, "nearest": q,
                             "activation": activation, **_geometry(fp)}
    return layers


def _clip_bounds(node, initializers: dict) -> tuple[float, float]:
    """(low, high) of a Relu or Clip (opset 11+: bounds as inputs; older: attributes)."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    low, high = -math.inf, math.inf
    attributes = {a.name: a.f for a in node.attribute}
    low, high = attributes.get("min", low), attributes.get("max", high)
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in initializers:
            return -math.inf, math.inf  # a computed bound: treat the Conv as unactivated
        low = float(initializers[node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in initializers:
            return -math.inf, math.inf
        high = float(initializers[node.input[2]])
    return low, high


def _geometry(node) -> dict:
    attributes = {a.name: a for a in node.attribute}

    def ints(name: str, default: list[int]) -> list[int]:
        return list(attributes[name].ints) if name in attributes else default

    if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"NOTSET", b""):
        raise PipelineError(f"AdaRound: Conv {node.name} uses auto_pad, which the simplified graph never has")
    return {"pads": ints("pads", [0, 0, 0, 0]), "strides": ints("strides", [1, 1]),
            "dilations": ints("dilations", [1, 1]), "group": attributes["group"].i if "group" in attributes else 1}


def _sample_patches(x: np.ndarray, layer: dict, positions: int, generator):
    """`positions` random output positions per image of the Conv, as im2col patches (N*positions, group,
    Cin/group * kh * kw): the Conv at those positions is then one batched matmul. Returns the patches and
    the FP32 layer's output there (N*positions, Cout), the optimisation's target."""
    import torch
    import torch.nn.functional as F

    top, left, bottom, right = layer["pads"]
    padded = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    columns = F.unfold(padded, layer["weight"].shape[2:], dilation=layer["dilations"], stride=layer["strides"])
    n, depth, count = columns.shape  # (N, Cin*kh*kw, L)
    picked = torch.from_numpy(generator.integers(0, count, size=(n, min(positions, count))))
    sampled = torch.gather(columns, 2, picked.unsqueeze(1).expand(n, depth, picked.shape[1]))  # (N, D, P)
    group = layer["group"]
    patches = sampled.permute(0, 2, 1).reshape(-1, group, depth // group).contiguous()
    target = _layer_output(patches, torch.from_numpy(layer["weight"]), torch.from_numpy(layer["bias"]),
                           layer["activation"])
    return patches.numpy(), target.numpy()


def _layer_output(patches, weight, bias, activation):
    """f(conv) at the sampled positions: patches (S, G, D), weight (Cout, ...) -> (S, Cout)."""
    import torch

    group = patches.shape[1]
    if group == weight.shape[0]:  # depthwise: one output per group (a batched matmul of width 1 is slow)
        out = torch.einsum("sgd,gd->sg", patches, weight.reshape(group, -1)) + bias
    else:
        w = weight.reshape(group, weight.shape[0] // group, -1)  # (G, Cout/G, D)
        out = torch.einsum("sgd,god->sgo", patches, w).reshape(patches.shape[0], -1) + bias
    if activation is not None:
        out = out.clamp(min=None if math.isinf(activation[0]) else activation[0],
                        max=None if math.isinf(activation[1]) else activation[1])
    return out


def _optimise(layer: dict, samples, target, iterations: int, generator) -> LayerResult:
    """The paper's per-layer optimisation on the sampled patches of one Conv."""
    import torch

    weight = torch.from_numpy(layer["weight"])
    bias = torch.from_numpy(layer["bias"])
    scale = torch.from_numpy(layer["scale"]).reshape((-1,) + (1,) * (weight.ndim - 1))
    activation = layer["activation"]
    nearest = torch.from_numpy(layer["nearest"].astype(np.float32))
    scaled = weight / scale
    floor = torch.floor(scaled)
    # Nearest rounding is the start: h(V) = the fractional part (the paper's initialisation).
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=LEARNING_RATE)
    warm = int(WARM_UP * iterations)
    for step in range(iterations):
        h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        soft = scale * (floor + h).clamp(QMIN, QMAX)
        index = torch.randint(0, samples.shape[0], (min(BATCH, samples.shape[0]),), generator=generator)
        out = _layer_output(samples[index], soft, bias, activation)
        loss = (out - target[index]).pow(2).sum(1).mean()
        if step >= warm:
            progress = (step - warm) / max(1, iterations - warm)
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(progress * math.pi))
            loss = loss + REGULARISATION * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        learnt = (floor + (v >= 0).float()).clamp(QMIN, QMAX)
        # Nearest rounding may differ from ONNX Runtime's (round half to even): start from the model's own values.
        learnt = torch.where((learnt - nearest).abs() > 1, nearest, learnt)

        def error(q) -> float:
            return float((_layer_output(samples, scale * q, bias, activation) - target).pow(2).mean())

        e_nearest, e_learnt = error(nearest), error(learnt)
    if e_learnt >= e_nearest:  # no gain on its own samples: keep nearest rounding
        return LayerResult(layer["nearest"].copy(), 0.0, e_nearest, e_nearest)
    changed = float((learnt != nearest).float().mean())
    return LayerResult(learnt.numpy().astype(np.int8), changed, e_nearest, e_learnt)
