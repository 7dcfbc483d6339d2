"""The models a bundle carries, and the logits each gives on the golden images: the OpenVINO IR of the
CPU target, or the ONNX models a GPU target's engines are built from on the device (FP32, FP16, the
gated INT8 Q/DQ, its FP16-typed twin for strongly typed TensorRT and a fallback with more layers in float)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.layout import GATE_FILE, LOGITS_FILE, ONNX_FILE, TABLE_FILE
from pipeline.stages.bundle.golden import Golden, check_logits

if TYPE_CHECKING:
    from pipeline.context import BuildContext

MODELS = "models"
CALIBRATION = TABLE_FILE  # the calibration table, under the same name in the bundle


def gpu_models(ctx: "BuildContext", inputs: dict, folder: Path, golden: Golden):
    from pipeline.stages.fp16 import CONVERTER
    from targets.onnxruntime import OnnxRuntimeRunner

    threads = ctx.threads
    models = folder / MODELS

    def onnx_runner(path: Path, fp16_typed: bool = False, exact: bool = False):
        return lambda: OnnxRuntimeRunner(path, threads=threads, fp16_typed=fp16_typed, exact=exact)

    shutil.copyfile(inputs["simplify"].path(ONNX_FILE), models / "fp32.onnx")
    shutil.copyfile(inputs["fp16"].path(ONNX_FILE), models / "fp16.onnx")
    artifacts = {
        "fp32": {"file": "models/fp32.onnx", "kind": "onnx", "stage": "simplify"},
        "fp16": {"file": "models/fp16.onnx", "kind": "onnx", "stage": "fp16", "converter": CONVERTER},
    }
    measured = {
        "fp32": (golden.logits(onnx_runner(models / "fp32.onnx"), check_logits(ctx, inputs, "simplify")),
                 "onnxruntime CPU, models/fp32.onnx", {}),
        "fp16": (golden.logits(onnx_runner(models / "fp16.onnx", fp16_typed=True), check_logits(ctx, inputs, "fp16")),
                 "onnxruntime CPU (graph optimizations off), models/fp16.onnx: FP16 computed on a CPU", {}),
    }
    if "quantize" in inputs:
        gate = json.loads(inputs["quantize"].path(GATE_FILE).read_text())
        excluded = list(gate["excluded_layers"])
        fallback = fallback_layers(gate, ctx.config.quantization.fallback_group)
        shutil.copyfile(inputs["quantize"].path(ONNX_FILE), models / "int8_qdq.onnx")
        shutil.copyfile(inputs["quantize_fp16"].path(ONNX_FILE), models / "int8_qdq_fp16.onnx")
        _write_fallback(inputs, excluded + fallback, models / "int8_qdq_fallback.onnx", ctx.config)
        artifacts["int8"] = {
            "file": "models/int8_qdq.onnx", "kind": "onnx", "stage": "quantize",
            "strongly_typed": "models/int8_qdq_fp16.onnx", "fallback": "models/int8_qdq_fallback.onnx",
            "calibration": CALIBRATION, "layers_in_float": excluded, "fallback_layers_in_float": excluded + fallback,
            "strongly_typed_opset": _opset(models / "int8_qdq_fp16.onnx"),
        }
        from pipeline.stages.quantize.overflow import host_int8_saturates_tensorrt_model

        exact = host_int8_saturates_tensorrt_model(ctx.config)  # as the gate judged it
        int8 = golden.logits(onnx_runner(models / "int8_qdq.onnx", exact=exact), [inputs["quantize"].path(LOGITS_FILE)])
        variants = {
            "models/int8_qdq_fp16.onnx": golden.logits(onnx_runner(models / "int8_qdq_fp16.onnx", fp16_typed=True),
                                                       check_logits(ctx, inputs, "quantize_fp16")),
            "models/int8_qdq_fallback.onnx": golden.logits(onnx_runner(models / "int8_qdq_fallback.onnx", exact=exact)),
        }
        measured["int8"] = (int8, "onnxruntime CPU, models/int8_qdq.onnx (INT8 Q/DQ, float between)", variants)
        artifacts["int8"]["optimize"] = {"models/int8_qdq_fp16.onnx": False}
    artifacts["fp16"]["optimize"] = False  # ONNX Runtime runs FP16-typed graphs right only without optimizations
    return artifacts, measured


def fallback_layers(gate: dict, group: int) -> list[str]:
    """The next 2 * fallback_group layers of the gate's ranking (worst first) that the gate kept in INT8."""
    excluded = set(gate["excluded_layers"])
    ranked = [layer["node"] for layer in gate.get("ranking", []) if layer["node"] not in excluded]
    return ranked[: 2 * group]


def _write_fallback(inputs: dict, excluded: list[str], output: Path, config) -> None:
    from calibration.statistics import CalibrationTable
    from pipeline.stages.quantize.adaround import saved_rounding
    from pipeline.stages.quantize.bias import saved_shifts
    from pipeline.stages.quantize.qdq import write_qdq_model
    from pipeline.stages.quantize.options import qdq_options

    table = CalibrationTable.load(inputs["calibrate"].path(CALIBRATION))
    source = "equalize" if "equalize" in inputs else "simplify"  # the FP32 ONNX the quantize stage quantized
    write_qdq_model(inputs[source].path(ONNX_FILE), table.amax, output, excluded,
                    bias_shifts=saved_shifts(inputs["quantize"].folder), weight_rounding=saved_rounding(inputs["quantize"].folder),
                    **qdq_options(config))


def cpu_model(ctx: "BuildContext", inputs: dict, folder: Path, golden: Golden):
    from pipeline.stages.openvino import DEPLOYED_STAGE
    from targets.openvino import OpenVinoRunner, inference_precision, precision_hint

    precision = ctx.config.precision
    stage = DEPLOYED_STAGE[precision]
    record = inputs[stage]
    for name in ("model.xml", "model.bin"):
        shutil.copyfile(record.path(name), folder / MODELS / name)
    hint = inference_precision(precision, ctx.config.openvino.inference_precision)

    def runner():
        return OpenVinoRunner(folder / MODELS / "model.xml", inference_precision=precision_hint(hint),
                              threads=ctx.threads)

    artifacts = {precision: {"file": "models/model.xml", "weights": "models/model.bin", "kind": "openvino",
                             "stage": stage, "inference_precision": hint}}
    reuse = check_logits(ctx, inputs, stage)
    logits = golden.logits(runner, reuse)
    ran = "openvino CPU"
    if reuse:
        ran += f" (precision ran: {json.loads((ctx.root / f'check_{stage}' / 'stage.json').read_text()).get('precision_ran')})"
    return artifacts, {precision: (logits, f"{ran}, models/model.xml, inference precision {hint}", {})}


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
