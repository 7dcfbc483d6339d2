"""The fp16 and quantize_fp16 stages of the GPU targets: a plain FP16 model and an FP16-typed Q/DQ model.

Both come from onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`: every float
tensor and initializer becomes float16, the graph's input and output stay float32 (Cast nodes at the
edges), so the device feeds the same float32 input to every precision.

The FP16-typed Q/DQ model is what strongly typed TensorRT builds (TensorRT 11, `--stronglyTyped`)
take for INT8: QuantizeLinear / DequantizeLinear accept float16 scales only from opset 19, so the
model's opset is raised first with ONNX's version converter (which rewrites every op whose
definition changed, not just the opset number). The INT8 weights stay int8 initializers behind their
DequantizeLinear: nothing is constant-folded (folding would remove INT8 from those layers).

ONNX Runtime's CPU provider computes FP16-typed graphs wrongly when its graph optimizations run
(design.md), so the host checks these models with optimizations off (`OnnxRuntimeRunner(fp16_typed=True)`);
on a CPU the result is only a proxy for what a GPU computes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.stages.base import ONNX_FILE, Stage, fp16_onnx_runner

CONVERTER = "onnxconverter-common convert_float_to_float16(keep_io_types=True)"
FP16_QDQ_OPSET = 19  # the first opset whose QuantizeLinear / DequantizeLinear take float16 scales
FP16_TYPED_STAGES = ("fp16", "quantize_fp16")  # ONNX Runtime runs their ONNX right only with optimizations off
_CHECK = {"graph_optimizations": "off"}
_MODULES = ("targets.runner", "targets.onnxruntime")


def fp16_stage(config) -> Stage:
    return Stage("fp16", "FP16 ONNX (float32 input/output), checked in ONNX Runtime on the CPU (host proxy)",
                 ("simplify",), {"keep_io_types": True}, ("onnx", "onnxconverter-common"), produce_fp16, ONNX_FILE,
                 runner=fp16_onnx_runner, check_settings=_CHECK, modules=_MODULES)


def quantize_fp16_stage(config) -> Stage:
    return Stage("quantize_fp16", "FP16-typed Q/DQ ONNX (opset 19) for strongly typed TensorRT",
                 ("quantize",), {"keep_io_types": True}, ("onnx", "onnxconverter-common"),
                 produce_quantize_fp16, ONNX_FILE, runner=fp16_onnx_runner, int8=True,
                 check_settings=_CHECK, modules=_MODULES)


def produce_fp16(ctx, inputs: dict, folder: Path) -> dict:
    return write_fp16_model(inputs["simplify"].path(ONNX_FILE), folder / ONNX_FILE)


def produce_quantize_fp16(ctx, inputs: dict, folder: Path) -> dict:
    """The gated Q/DQ model, FP16-typed for strongly typed TensorRT (same layers in float)."""
    return write_fp16_qdq_model(inputs["quantize"].path(ONNX_FILE), folder / ONNX_FILE)


def write_fp16_model(source: str | os.PathLike, output: str | os.PathLike) -> dict:
    """FP16 copy of an FP32 ONNX (float32 input and output kept)."""
    import onnx

    model = onnx.load(str(_existing(source)))
    fp16 = _to_fp16(model)
    _save(fp16, Path(output))
    return {"converter": CONVERTER, "opset": _opset(fp16)}


def write_fp16_qdq_model(source: str | os.PathLike, output: str | os.PathLike) -> dict:
    """FP16-typed copy of an INT8 Q/DQ ONNX: float tensors, weights and Q/DQ scales float16, INT8 weights kept."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(_existing(source)))
    opset_before = _opset(model)
    if opset_before < FP16_QDQ_OPSET:
        try:
            model = version_converter.convert_version(model, FP16_QDQ_OPSET)
        except Exception as error:  # the converter raises plain RuntimeErrors with long texts
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PipelineError(f"{source}: cannot raise the opset to {FP16_QDQ_OPSET} for FP16 Q/DQ scales ({first})") from None
    fp16 = _to_fp16(model)
    _save(fp16, Path(output))
    return {"converter": CONVERTER, "opset_before": opset_before, "opset": _opset(fp16), **describe_fp16_qdq(fp16)}


def describe_fp16_qdq(model) -> dict:
    """Element types of a Q/DQ model's weights, scales and activations (for the manifest and the tests)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    name_of = onnx.TensorProto.DataType.Name
    weight_types, scale_types, activation_dq = set(), set(), 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = initializers.get(node.input[1])
        if scale is not None:
            scale_types.add(name_of(scale.data_type).lower())
        if node.op_type == "DequantizeLinear":
            if node.input[0] in initializers:
                weight_types.add(name_of(initializers[node.input[0]].data_type).lower())
            else:
                activation_dq += 1
    float_initializers = sorted({name_of(init.data_type).lower() for init in graph.initializer
                                 if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)})
    return {"weight_types": sorted(weight_types), "scale_types": sorted(scale_types),
            "float_initializer_types": float_initializers, "activation_dequantize": activation_dq,
            "weight_dequantize": sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers)}


def _to_fp16(model):
    from onnxconverter_common.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        # It warns once per initializer it clamps into float16's range: a note, not an error.
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"ONNX model not found: {path}")
    return path


def _save(model, path: Path) -> None:
    import onnx

    from pipeline.stages.quantize.qdq import save_model_atomically

    onnx.checker.check_model(model)
    save_model_atomically(model, path)
