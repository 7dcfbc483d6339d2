"""Which quantized layers hurt most, and the fallback loop that returns them to float.

`rank_layers` measures every quantized Conv in one pass, with no model rebuilt per layer: the FP32
model and the Q/DQ model each run once over a few images (e.g. 16). Both keep the FP32 tensor names
(the Q/DQ nodes sit on new tensors in between), so every quantized Conv's float input and output
are added as graph outputs of both. The FP32 run also carries one probe per quantized Conv: a
copy of the Conv that reads the FP32 input through the layer's own Q/DQ (same scale) and uses the
layer's INT8 weights. Per Conv:

- local_sqnr_db, THE RANKING SCORE: SQNR of the probe's output against the FP32 Conv output: the
  error of this layer alone (its INT8 input and INT8 weights, fed with exact FP32 data);
- sqnr_db: SQNR of the Conv's output in the Q/DQ model against FP32: upstream error plus its own;
- input_sqnr_db: SQNR of the float tensor the Conv reads in the Q/DQ model (before its own Q/DQ),
  the error that arrives from upstream (inf for the network input);
- added_db = min(input_sqnr_db, SQNR_CEILING_DB) - sqnr_db: the SQNR lost across the layer in the
  Q/DQ model. Reported, not ranked on: it also counts how the layer amplifies the noise that
  arrives from upstream, which falling back to float does not remove (a projection conv that
  cancels most of its input's signal loses many dB with little quantization error of its own).
  Measured on EfficientNet-Lite0 (minmax, 128 val images, logit SQNR 19.0 dB with everything
  quantized): the 8 worst layers by local_sqnr_db in float give 22.6 dB, the 8 worst by added_db
  20.3 dB, the 8 best by added_db 19.2 dB.

Layers are ranked worst first: local_sqnr_db ascending, ties by node name (deterministic).
SQNR = 10 log10(sum ref^2 / sum (q - ref)^2) over all images and elements, summed in float64.
Statistics are accumulated batch by batch, so memory is one batch of intermediate outputs.

`fallback` drives the accuracy gate with any evaluate function: it keeps the worst layers in
float, group by group, until the gate passes or `max_layers` are excluded.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import PipelineError

SQNR_CEILING_DB = 100.0  # "no noise": far above INT8 (about 40 dB per layer) and float32 rounding noise


@dataclass(frozen=True)
class LayerSensitivity:
    node: str  # the Conv's node name (what `write_qdq_model(exclude_nodes=...)` takes)
    output: str  # its output tensor
    local_sqnr_db: float  # the ranking score: this layer alone against FP32 (lower = worse)
    sqnr_db: float  # its output in the Q/DQ model against FP32 (upstream error included)
    input_sqnr_db: float  # its float input in the Q/DQ model against FP32 (inf: no upstream error)
    added_db: float  # SQNR lost across the layer in the Q/DQ model (see the module docs)

    def as_dict(self) -> dict:
        return {k: _json_number(v) for k, v in asdict(self).items()}


def rank_layers(
    fp32_onnx_path: str | os.PathLike,
    qdq_onnx_path: str | os.PathLike,
    images: np.ndarray,
    batch_size: int = 4,
    threads: int | None = None,
) -> list[LayerSensitivity]:
    """Every quantized Conv of the Q/DQ model, worst first; `images` are float32 NCHW inputs.

    Memory is about three copies of one batch's activations (Inception-v4 at 299, batch 4: 3 GB
    peak; 16 images take 23 s on 2 cores, EfficientNet-Lite0 4 s).
    """
    import onnx

    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) array, got shape {images.shape}")
    qdq = onnx.load(str(qdq_onnx_path))
    fp32 = onnx.load(str(fp32_onnx_path))
    layers = _quantized_convs(qdq.graph)
    if not layers:
        raise PipelineError(f"{qdq_onnx_path} has no quantized Conv: nothing to rank")
    weights = {w.name for w in fp32.graph.initializer}
    (input_name,) = [i.name for i in fp32.graph.input if i.name not in weights]
    produced = {name for node in fp32.graph.node for name in node.output}
    tensors = list(dict.fromkeys(t for layer in layers for t in (layer.source, layer.conv.output[0])))
    missing = [t for t in tensors if t not in produced and t != input_name]
    if missing:
        raise PipelineError(
            f"the Q/DQ model {qdq_onnx_path} was not made from {fp32_onnx_path}: "
            f"tensors {missing[:3]} are not in it"
        )

    fetched = [t for t in tensors if t != input_name]  # the input is the same in both runs
    probes = _add_probes(fp32, qdq, layers)
    reference = _session_with_outputs(fp32, fetched + probes, threads)
    quantized = _session_with_outputs(qdq, fetched, threads)
    error = _ErrorPower()
    for start in range(0, len(images), batch_size):
        feed = {input_name: np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)}
        ref_values = dict(zip(fetched + probes, reference.run(fetched + probes, feed)))
        for name, q in zip(fetched, quantized.run(fetched, feed)):
            error.add(name, ref_values[name], q)
        for layer, probe in zip(layers, probes):
            error.add(probe, ref_values[layer.conv.output[0]], ref_values[probe])
        del ref_values

    ranking = []
    for layer, probe in zip(layers, probes):
        output = layer.conv.output[0]
        input_sqnr = math.inf if layer.source == input_name else error.sqnr_db(layer.source)
        output_sqnr = error.sqnr_db(output)
        added = min(input_sqnr, SQNR_CEILING_DB) - min(output_sqnr, SQNR_CEILING_DB)
        ranking.append(LayerSensitivity(layer.conv.name, output, error.sqnr_db(probe), output_sqnr, input_sqnr, added))
    return sorted(ranking, key=lambda layer: (layer.local_sqnr_db, layer.node))


@dataclass(frozen=True)
class FallbackAttempt:
    excluded: tuple[str, ...]  # Convs kept in float for this attempt
    passed: bool
    figure: float  # the gate's figure of merit (e.g. top-1 agreement)
    details: Any = None  # whatever evaluate returned with it (e.g. a DriftResult)

    def as_dict(self) -> dict:
        details = self.details.as_dict() if hasattr(self.details, "as_dict") else self.details
        return {
            "excluded_count": len(self.excluded),
            "excluded": list(self.excluded),
            "passed": self.passed,
            "figure": _json_number(self.figure),
            "details": details,
        }


@dataclass(frozen=True)
class FallbackResult:
    passed: bool
    best: FallbackAttempt  # the first attempt that passed; else the one with the best figure
    attempts: tuple[FallbackAttempt, ...]  # in the order they ran; attempts[0] excludes nothing

    @property
    def excluded(self) -> tuple[str, ...]:
        return self.best.excluded

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "excluded": list(self.best.excluded),
            "initial_figure": _json_number(self.attempts[0].figure),  # everything quantized
            "best_figure": _json_number(self.best.figure),
            "attempts": [a.as_dict() for a in self.attempts],
        }


Evaluate = Callable[[tuple[str, ...]], "tuple[bool, float, Any]"]


def fallback(
    evaluate: Evaluate,
    rank: Sequence[LayerSensitivity | str],
    max_layers: int,
    group_size: int = 1,
    higher_is_better: bool = True,
) -> FallbackResult:
    """Keep the worst-ranked layers in float until `evaluate` passes.

    evaluate(excluded_nodes) -> (passed, figure, details): the caller writes the Q/DQ model with
    those Convs in float and runs its drift check. The first attempt excludes nothing; each next
    attempt adds the next `group_size` layers of `rank` (worst first), so attempt k excludes the
    k * group_size worst layers. Fixed groups (not doubling) keep the result minimal to within one
    group, and the cost is one evaluation per group, predictable from max_layers / group_size.
    Stops at the first attempt that passes, or when `max_layers` layers (or all ranked layers)
    are excluded. `figure` only chooses the best attempt when none passes (`higher_is_better`
    says which way is better: agreement up, top-1 drop down).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if max_layers < 0:
        raise ValueError(f"max_layers must not be negative, got {max_layers}")
    order = [layer.node if isinstance(layer, LayerSensitivity) else layer for layer in rank]
    if len(set(order)) != len(order):
        raise ValueError("the ranking names a layer twice")
    limit = min(max_layers, len(order))

    attempts: list[FallbackAttempt] = []
    count = 0
    while True:
        excluded = tuple(order[:count])
        passed, figure, details = evaluate(excluded)
        attempts.append(FallbackAttempt(excluded, bool(passed), float(figure), details))
        if passed or count >= limit:
            break
        count = min(count + group_size, limit)

    if attempts[-1].passed:
        best = attempts[-1]
    else:
        sign = 1.0 if higher_is_better else -1.0
        # The best figure; among equals the fewest exclusions (the earliest attempt).
        best = max(attempts, key=lambda a: (sign * a.figure if math.isfinite(a.figure) else -math.inf,
                                            -len(a.excluded)))
    return FallbackResult(passed=best.passed, best=best, attempts=tuple(attempts))


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _QuantizedConv:
    conv: Any  # the Conv NodeProto of the Q/DQ model
    source: str  # the float tensor its input QuantizeLinear reads
    input_q: Any  # that QuantizeLinear
    weight_dq: Any  # the DequantizeLinear of its INT8 weights


def _quantized_convs(graph) -> list[_QuantizedConv]:
    """Every Conv whose input and weights come through Q/DQ, in graph order."""
    producer = {name: node for node in graph.node for name in node.output}

    def made_by(name: str, op_type: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    layers = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        dq_input, dq_weight = made_by(node.input[0], "DequantizeLinear"), made_by(node.input[1], "DequantizeLinear")
        q = made_by(dq_input.input[0], "QuantizeLinear") if dq_input is not None else None
        if q is not None and dq_weight is not None:
            layers.append(_QuantizedConv(node, q.input[0], q, dq_weight))
    return layers


PROBE = "sensitivity_probe/"


def _add_probes(fp32, qdq, layers: list[_QuantizedConv]) -> list[str]:
    """Add to the FP32 model, per quantized Conv, a copy fed through its Q/DQ with its INT8
    weights (initializers copied from the Q/DQ model under the PROBE prefix); returns their outputs."""
    from onnx import helper

    qdq_initializers = {i.name: i for i in qdq.graph.initializer}
    copied: set[str] = set()

    def constant(name: str) -> str:
        if name not in qdq_initializers:
            raise PipelineError(f"the Q/DQ model has no initializer {name!r}: rewrite it with write_qdq_model")
        if name not in copied:
            initializer = type(qdq_initializers[name])()
            initializer.CopyFrom(qdq_initializers[name])
            initializer.name = PROBE + name
            fp32.graph.initializer.append(initializer)
            copied.add(name)
        return PROBE + name

    outputs = []
    for layer in layers:
        prefix = PROBE + layer.conv.name
        scale, zero_point = (constant(n) for n in layer.input_q.input[1:3])
        weight_inputs = [constant(n) for n in layer.weight_dq.input]
        weight_axis = {a.name: helper.get_attribute_value(a) for a in layer.weight_dq.attribute}
        conv_attributes = {a.name: helper.get_attribute_value(a) for a in layer.conv.attribute}
        bias = [constant(n) if n in qdq_initializers else n for n in layer.conv.input[2:]]
        fp32.graph.node.extend([
            helper.make_node("QuantizeLinear", [layer.source, scale, zero_point], [prefix + "/q"], prefix + "/Q"),
            helper.make_node("DequantizeLinear", [prefix + "/q", scale, zero_point], [prefix + "/dq"], prefix + "/DQ"),
            helper.make_node("DequantizeLinear", weight_inputs, [prefix + "/w"], prefix + "/DQW", **weight_axis),
            helper.make_node("Conv", [prefix + "/dq", prefix + "/w", *bias], [prefix + "/y"], prefix + "/Conv",
                             **conv_attributes),
        ])
        outputs.append(prefix + "/y")
    return outputs


class _ErrorPower:
    """Running sums of ref^2 and (q - ref)^2 per tensor, in float64."""

    def __init__(self):
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def add(self, name: str, ref: np.ndarray, q: np.ndarray) -> None:
        ref = ref.astype(np.float64)
        self.signal[name] = self.signal.get(name, 0.0) + float(np.sum(ref * ref))
        self.noise[name] = self.noise.get(name, 0.0) + float(np.sum((q - ref) ** 2))

    def sqnr_db(self, name: str) -> float:
        signal, noise = self.signal[name], self.noise[name]
        if noise == 0.0:
            return math.inf
        if signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(signal / noise)


def _session_with_outputs(model, names: Sequence[str], threads: int | None):
    import onnx

    from targets.onnxruntime import open_session

    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: the caller's model stays as it was
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)  # types inferred by ORT
    return open_session(model, threads)


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "-inf" / "nan": strict JSON, as pipeline.drift writes them
    return value
