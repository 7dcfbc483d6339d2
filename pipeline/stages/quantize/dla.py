"""Which tensors a DLA build may run in INT8, and which of them share one range in its calibration cache.

DLA on JetPack 6 takes INT8 from implicit calibration: a scale for every tensor that should be INT8,
not only the Conv inputs the Q/DQ model quantizes. A tensor without one runs in FP16, silently. So
the calibrate stage of a Jetson build also records the range of every Conv, ReLU/Clip, pool, Concat,
Add, Mul and BatchNormalization output, and these rules (NVIDIA's DLA-SW qdq-translator applies the
same ones to its Q/DQ graphs) say which tensors take another's range:

- ReLU / Clip: a Conv's output read only by the ReLU takes the ReLU output's range (TensorRT fuses
  Conv + ReLU into one INT8 layer whose output is the ReLU's);
- MaxPool: the output takes its input's range (max pooling never widens it; no requantization);
- Concat: every input takes the output's range (one scale; DLA concatenates without rescaling).

Concat wins over MaxPool (a pool branch ending in a Concat takes the Concat's range), and chains
resolve through ReLUs (the Conv before a ReLU that feeds a Concat takes the Concat's range). The
table keeps every tensor's own range; the device writes the cache from these links
(`targets/tensorrt/calibration_cache.py`, `dla_amax_from_table`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

INT8_OPS = ("Conv", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Add", "Mul",
            "BatchNormalization")


def _graph(model: "onnx.ModelProto | str | os.PathLike"):
    import onnx

    return (model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)).graph


def dla_tensors(model) -> list[str]:
    """The graph input and every INT8_OPS output, in graph order: the tensors a DLA build may run in INT8."""
    graph = _graph(model)
    initializers = {i.name for i in graph.initializer}
    names = [value.name for value in graph.input if value.name not in initializers]
    names += [node.output[0] for node in graph.node if node.op_type in INT8_OPS and node.output]
    return list(dict.fromkeys(names))


def shared_ranges(model) -> dict[str, str]:
    """tensor -> the tensor whose range it takes in the DLA cache (resolved: values take their own)."""
    graph = _graph(model)
    nodes = list(graph.node)
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producers = {out: node for node in nodes for out in node.output}
    share: dict[str, str] = {}

    def root(name: str) -> str:
        seen = set()
        while name in share and name not in seen:
            seen.add(name)
            name = share[name]
        return name

    for node in nodes:  # forward: a MaxPool output takes its input's range
        if node.op_type == "MaxPool":
            share[node.output[0]] = root(node.input[0])
    for node in reversed(nodes):  # backward: Concat inputs take the output's; a Conv its ReLU's
        if node.op_type == "Concat":
            for name in node.input:
                if root(node.output[0]) != name:
                    share[name] = root(node.output[0])
        elif node.op_type in ("Relu", "Clip"):
            source = producers.get(node.input[0])
            if source is not None and source.op_type == "Conv" and readers.get(node.input[0]) == 1:
                share[node.input[0]] = root(node.output[0])
    return {name: root(name) for name in share if root(name) != name}
