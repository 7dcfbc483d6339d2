"""The int8 weights of a Q/DQ model's Convs, as `qdq` writes them: what bias correction and AdaRound read back,
and the FP32 model's constants they compare them with.

(A module of its own: `qdq` imports both of those, so neither may import `qdq`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


def int8_conv_weights(qdq_model: "onnx.ModelProto", conv_names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{Conv name: (its int8 weights, their scale)} for each Conv of `conv_names` whose weights the Q/DQ model
    reads through an int8 DequantizeLinear of an initializer (a Conv kept in float has none)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in qdq_model.graph.initializer}
    dequantize = {node.output[0]: node for node in qdq_model.graph.node if node.op_type == "DequantizeLinear"}
    found = {}
    for node in qdq_model.graph.node:
        if node.op_type != "Conv" or node.name not in conv_names or node.input[1] not in dequantize:
            continue
        dq = dequantize[node.input[1]]
        if dq.input[0] not in initializers:
            continue  # an activation pair, not weights
        found[node.name] = (numpy_helper.to_array(initializers[dq.input[0]]),
                            numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float32))
    return found


def fp32_constants(model: "onnx.ModelProto") -> dict[str, np.ndarray]:
    """Every constant tensor of an FP32 model by name: its initializers and its Constant nodes (onnxsim leaves
    Inception-ResNet's residual projection weights, the residual scale folded in, and the Clip bounds as
    Constant nodes; `write_qdq_model` makes them initializers of the Q/DQ model under the same names)."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return constants
