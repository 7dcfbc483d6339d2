"""Residual Adds in INT8, the way TensorRT fuses them (`quantization.residual_adds`, off by default).

TensorRT fuses a residual Add into the INT8 Conv that produces one of its inputs when both inputs come
through Q/DQ: Add(DQ(Q(conv output)), DQ(Q(skip))). The skip tensor of a residual block already has a
pair, because the next block's Convs read it; the Conv output gets one of its own, with its own range
from the calibration table. Our default keeps both inputs in float (the residual stream collects no
rounding noise; docs/int8.md); this placement is what NVIDIA Model Optimizer and NNCF do, and lets
OpenVINO run the block without leaving INT8 (measured on Lite0: docs/results.md).
"""

from __future__ import annotations

from typing import Mapping


def residual_pairs(graph, quantized_convs: set[str], quantized_tensors: set[str]) -> list[tuple[str, str, str]]:
    """(Add node, Conv output, skip tensor) of every Add that reads a quantized Conv's output (read by the Add
    alone) and a tensor that already carries a pair."""
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    pairs = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for conv_out, skip in (tuple(node.input), tuple(reversed(node.input))):
            conv = producers.get(conv_out)
            if (conv is not None and conv.op_type == "Conv" and conv.name in quantized_convs
                    and readers.get(conv_out) == 1 and skip in quantized_tensors and skip != conv_out):
                pairs.append((node.name, conv_out, skip))
                break
    return pairs


def place_residual_pairs(model, pairs: list[tuple[str, str, str]], amax: Mapping[str, float]) -> None:
    """Rewire each Add of `pairs` to read both inputs through Q/DQ (in place): the skip through its existing
    pair, the Conv output through a new one (symmetric INT8, scale = amax / 127, zero point 0)."""
    from pipeline.stages.quantize.pairs import add_pair, dequantized_outputs

    graph = model.graph
    dequantized = dequantized_outputs(graph)
    adds = {node.name: node for node in graph.node}
    for add_name, conv_out, skip in pairs:
        branch = add_pair(graph, conv_out, amax[conv_out], "residual")
        add = adds[add_name]
        add.input[list(add.input).index(skip)] = dequantized[skip]
        add.input[list(add.input).index(conv_out)] = branch
