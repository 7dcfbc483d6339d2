"""Activation Q/DQ pairs that the optional placements add after ONNX Runtime's quantizer (`residual`, `head`).

(A module of its own: both placements use it, and `qdq` imports both.)
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def dequantized_outputs(graph) -> dict[str, str]:
    """{tensor: the output of the DequantizeLinear of its activation pair} for every pair of `graph`."""
    quantized_from = {q.output[0]: q.input[0] for q in graph.node if q.op_type == "QuantizeLinear"}
    return {quantized_from[dq.input[0]]: dq.output[0]
            for dq in graph.node if dq.op_type == "DequantizeLinear" and dq.input[0] in quantized_from}


def add_pair(graph, tensor: str, amax: float, tag: str) -> str:
    """Append a symmetric INT8 pair on `tensor` (scale amax / 127, zero point 0; `make_unsigned` may turn it
    UINT8 later), its names tagged with `tag`; returns the dequantized tensor for its readers."""
    from onnx import helper, numpy_helper

    scale, zero = f"{tensor}_{tag}_scale", f"{tensor}_{tag}_zero_point"
    graph.initializer.extend([numpy_helper.from_array(np.array(amax / INT8_MAX, np.float32), scale),
                              numpy_helper.from_array(np.array(0, np.int8), zero)])
    graph.node.extend([
        helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_{tag}_q"],
                         name=f"{tensor}_{tag}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{tensor}_{tag}_q", scale, zero], [f"{tensor}_{tag}_dq"],
                         name=f"{tensor}_{tag}_DequantizeLinear"),
    ])
    return f"{tensor}_{tag}_dq"
