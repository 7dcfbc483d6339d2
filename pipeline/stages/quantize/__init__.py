"""The quantize stage: the INT8 Q/DQ ONNX from the calibration table, through an accuracy gate that keeps
the most sensitive layers in float until both back ends (ONNX Runtime and OpenVINO) meet the INT8 budget.

`qdq` writes the Q/DQ model, `sensitivity` ranks layers, `gate` decides the fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import GATE_FILE, ONNX_FILE, TABLE_FILE, Stage, budget_variants, onnx_runner
from pipeline.stages.equalize import quantized_source
from pipeline.stages.quantize.overflow import host_int8_saturates_tensorrt_model, overflow_fix
from pipeline.stages.quantize.unsigned import unsigned_activations

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    q = config.quantization
    return Stage("quantize", "INT8 Q/DQ ONNX from the calibration table, accuracy gate with fallback",
                 (quantized_source(config), "calibrate", "reference"),
                 {"evaluation_images": q.evaluation_images, "decision_images": q.decision_images,
                  "bias_correction": q.bias_correction, "adaround": q.adaround,
                  "residual_adds": q.residual_adds, "int8_head": q.int8_head,
                  "unsigned_activations": unsigned_activations(config),
                  "overflow_fix": overflow_fix(config),  # resolved: auto decides by this machine's CPU
                  "judged_exactly": host_int8_saturates_tensorrt_model(config),  # GPU targets on a CPU without VNNI
                  "sensitivity_images": q.sensitivity_images,
                  "max_fallback_layers": q.max_fallback_layers, "fallback_group": q.fallback_group,
                  "budgets": budget_variants(config, ("quantize", "openvino_int8", "gate")),
                  "openvino_inference_precision": config.openvino.inference_precision},
                 ("onnxruntime", "onnx", "openvino"), produce_quantize, ONNX_FILE, runner=onnx_runner,
                 uses_calibration_images=True, uses_decision_images=True, int8=True, self_checked=True,
                 modules=("pipeline.stages.quantize.gate", "pipeline.stages.quantize.qdq", "pipeline.stages.quantize.bias",
                          "pipeline.stages.quantize.adaround", "pipeline.stages.quantize.residual",
                          "pipeline.stages.quantize.head", "pipeline.stages.quantize.pairs",
                          "pipeline.stages.quantize.unsigned",
                          "pipeline.stages.quantize.int8_weights",
                          "pipeline.stages.quantize.overflow", "pipeline.stages.quantize.options", "targets.cpu_features",
                          "pipeline.stages.quantize.sensitivity", "targets.openvino", "targets.onnxruntime",
                          "pipeline.executor.work"))


def produce_quantize(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """The INT8 Q/DQ ONNX, through the accuracy gate (which writes logits.npy of the final model)."""
    from calibration.statistics import CalibrationTable
    from pipeline.cache import write_json_atomic
    from pipeline.stages.quantize.gate import run_gate

    table = CalibrationTable.load(inputs["calibrate"].path(TABLE_FILE))
    gate = run_gate(ctx, inputs[quantized_source(ctx.config)].path(ONNX_FILE), table.amax, folder / ONNX_FILE)
    write_json_atomic(folder / GATE_FILE, gate)
    return {"excluded_layers": gate["excluded_layers"], "placement": gate["placement"]}
