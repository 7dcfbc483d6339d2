"""The OpenVINO stages of the CPU target: IRs converted from the simplified ONNX (FP32 and FP16 weights)
and from the gated Q/DQ ONNX (INT8), each checked in the precision it is deployed in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline.stages.base import IR_FILE, ONNX_FILE, Stage

if TYPE_CHECKING:
    from pipeline.context import BuildContext
    from pipeline.cache import StageRecord
    from pipeline.executor.work import RunnerSpec

DEPLOYED_STAGE = {"fp32": "openvino_fp32", "fp16": "openvino_fp16", "int8": "openvino_int8"}


def stages(config) -> list[Stage]:
    """The IR stages of a build: FP32 and FP16 always, INT8 for INT8 builds."""
    from targets.openvino import inference_precision, precision_hint

    configured = config.openvino.inference_precision
    deployed_hint = precision_hint(configured)
    ir = [
        Stage("openvino_fp32", "OpenVINO IR, FP32 weights (checked pinned to f32)", ("simplify",), {"precision": "fp32"},
              ("openvino",), _produce_ir("fp32"), IR_FILE, runner=_openvino_runner(inference_precision("fp32", configured)),
              check_settings={"inference_precision": "f32"}),
        Stage("openvino_fp16", "OpenVINO IR, FP16 weights", ("simplify",), {"precision": "fp16"},
              ("openvino",), _produce_ir("fp16"), IR_FILE, runner=_openvino_runner(deployed_hint),
              check_settings={"inference_precision": configured}),
    ]
    if config.precision == "int8":
        ir.append(Stage("openvino_int8", "OpenVINO IR converted from the Q/DQ ONNX", ("quantize",), {"precision": "fp32"},
                        ("openvino",), _produce_ir("fp32", source="quantize"), IR_FILE,
                        runner=_openvino_runner(deployed_hint), int8=True,
                        check_settings={"inference_precision": configured}, modules=("targets.openvino",)))
    return ir


def _produce_ir(precision: str, source: str = "simplify") -> Callable:
    """The IR stage's produce: `source`'s ONNX converted with `precision` weights."""
    def produce(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
        from targets.openvino import convert_to_ir

        convert_to_ir(inputs[source].path(ONNX_FILE), folder / IR_FILE, precision)
        return {"weights_precision": precision, "converted_from": f"{source}/{ONNX_FILE}"}

    return produce


def _openvino_runner(hint: str | None) -> Callable:
    def make(ctx: "BuildContext", record: "StageRecord") -> "RunnerSpec":
        from pipeline.executor.work import openvino_spec

        return openvino_spec(record.path(IR_FILE), hint, ctx.threads)

    return make
