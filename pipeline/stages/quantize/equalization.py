"""Cross-layer equalization of an FP32 ONNX graph (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", section 4.1), only where it is exact.

For a pair of Convs where the first one's output reaches the second alone (through at most a Relu and
a zero Pad, both equivariant to a positive per-channel scale), output channel i of the first Conv
(weights and bias) is divided by s_i and input channel i of the second multiplied by s_i: the
network computes the same function, and with s_i = sqrt(r1_i * r2_i) / r2_i (r: the per-channel
ranges of max |w|) both convolutions see the same range sqrt(r1_i * r2_i) in that channel. Chains
(A -> B -> C) are equalized pair by pair, a few rounds, since each pair moves its neighbours' ranges.

A Clip between the two (ReLU6, EfficientNet-Lite0's activation) is not scale-equivariant: the paper
replaces ReLU6 by ReLU, which changes the network; here such pairs are left as they are and counted.
The rewrite changes initializer values only (no node, no tensor name), so a calibration table, the
DLA tensor list and the bias-correction shifts of the equalized graph name the same tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROUNDS = 8  # rounds over all pairs; the scales settle in a few (the last round's largest change is recorded)
EQUIVARIANT = ("Relu", "Pad")  # f(x / s) = f(x) / s for s > 0, per channel (Pad: constant zero only)
NOT_EQUIVARIANT = ("Clip",)  # ReLU6 and its kind: pairs through them are counted as skipped


@dataclass(frozen=True)
class Pair:
    first: str  # Conv names
    second: str
    through: tuple[str, ...]  # op types between them


@dataclass
class EqualizationSummary:
    """What `equalize_model` did, for the stage manifest."""

    equalized: list[Pair] = field(default_factory=list)
    skipped: dict[str, list[Pair]] = field(default_factory=dict)  # reason -> pairs left as they were
    rounds: int = 0
    last_round_max_change: float = 0.0  # max |log s| of the last round: near 0 once the scales settled

    def as_dict(self) -> dict:
        return {"equalized_pairs": len(self.equalized),
                "skipped_pairs": {reason: len(pairs) for reason, pairs in self.skipped.items()},
                "pairs": [asdict(pair) for pair in self.equalized],
                "skipped": {reason: [asdict(pair) for pair in pairs] for reason, pairs in self.skipped.items()},
                "rounds": self.rounds, "last_round_max_change": self.last_round_max_change}


def conv_pairs(graph) -> tuple[list[Pair], dict[str, list[Pair]]]:
    """The Conv pairs that may be equalized exactly, and the ones that may not (by reason)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    initializers = {init.name: init for init in graph.initializer}

    pairs, skipped = [], {}
    for first in graph.node:
        if first.op_type != "Conv":
            continue
        tensor, through, second = first.output[0], [], None
        while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
            node = consumers[tensor][0]
            if node.op_type == "Conv":
                second = node if node.input[0] == tensor else None
                break
            if node.op_type not in EQUIVARIANT + NOT_EQUIVARIANT or node.input[0] != tensor:
                break
            through.append(node.op_type)
            tensor = node.output[0]
        if second is None:
            continue
        pair = Pair(first.name, second.name, tuple(through))
        reason = _why_not(first, second, through, graph, initializers, consumers)
        if reason:
            skipped.setdefault(reason, []).append(pair)
        else:
            pairs.append(pair)
    return pairs, skipped


def _why_not(first, second, through, graph, initializers, consumers) -> str:
    """Why a pair cannot be equalized exactly ('' when it can)."""
    if any(op in NOT_EQUIVARIANT for op in through):
        return "clip between the convs (ReLU6: not scale-equivariant)"
    for node in (first, second):
        own = [name for name in node.input[1:3] if name]
        if any(name not in initializers or len(consumers[name]) != 1 for name in own):
            return "weights not a conv's own initializer"
    if "Pad" in through and not _zero_constant_pads(first, second, graph, initializers):
        return "pad that is not a constant zero pad"
    w1 = initializers[first.input[1]].dims
    w2 = initializers[second.input[1]].dims
    g1, g2 = _group(first), _group(second)
    if g1 not in (1, w1[0]) or (g1 > 1 and w1[1] != 1):
        return "grouped conv (neither plain nor depthwise)"
    if not (g2 == 1 and w2[1] == w1[0]) and not (g2 == w1[0] and w2[0] == w1[0] and w2[1] == 1):
        return "grouped conv (neither plain nor depthwise)"
    return ""


def _zero_constant_pads(first, second, graph, initializers) -> bool:
    from onnx import helper, numpy_helper

    produced = {out: node for node in graph.node for out in node.output}
    tensor = second.input[0]
    while tensor != first.output[0]:
        node = produced[tensor]
        if node.op_type == "Pad":
            mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
            value = node.input[2] if len(node.input) > 2 else ""
            if mode != b"constant" or (value and (value not in initializers
                                                  or np.any(numpy_helper.to_array(initializers[value]) != 0))):
                return False
        tensor = node.input[0]
    return True


def _group(node) -> int:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)


def equalize_model(model, rounds: int = ROUNDS) -> EqualizationSummary:
    """Equalize every exact Conv pair of `model` in place; return what was done."""
    from onnx import numpy_helper

    graph = model.graph
    pairs, skipped = conv_pairs(graph)
    summary = EqualizationSummary(equalized=pairs, skipped=skipped)
    if not pairs:
        return summary
    nodes = {node.name: node for node in graph.node}
    inits = {init.name: init for init in graph.initializer}
    arrays = {}  # initializer name -> float64 array, written back once at the end
    for pair in pairs:
        for name in (pair.first, pair.second):
            node = nodes[name]
            for tensor in node.input[1:3]:
                if tensor and tensor not in arrays:
                    arrays[tensor] = numpy_helper.to_array(inits[tensor]).astype(np.float64)
    for _ in range(rounds):
        change = 0.0
        for pair in pairs:
            first, second = nodes[pair.first], nodes[pair.second]
            w1, w2 = arrays[first.input[1]], arrays[second.input[1]]
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)  # output channel i of the first
            depthwise_second = _group(second) > 1
            r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise_second
                  else np.abs(w2).max(axis=(0, 2, 3)))  # input channel i of the second
            scale = np.ones_like(r1)
            usable = (r1 > 0) & (r2 > 0)
            scale[usable] = np.sqrt(r1[usable] * r2[usable]) / r2[usable]
            w1 /= scale.reshape(-1, 1, 1, 1)
            if len(first.input) > 2 and first.input[2]:
                arrays[first.input[2]] /= scale
            w2 *= scale.reshape(-1, 1, 1, 1) if depthwise_second else scale.reshape(1, -1, 1, 1)
            change = max(change, float(np.abs(np.log(scale)).max()))
        summary.rounds += 1
        summary.last_round_max_change = change
        if change < 1e-6:
            break
    for name, array in arrays.items():
        init = inits[name]
        init.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(init).dtype), name))
    return summary


def write_equalized_model(source: Path, output: Path) -> EqualizationSummary:
    """The equalized copy of the FP32 ONNX `source` at `output`."""
    import onnx

    model = onnx.load(str(source))
    summary = equalize_model(model)
    onnx.save(model, str(output))
    return summary
