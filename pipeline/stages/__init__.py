"""The stage graph of every target, declared here once; each stage lives in the module named after it.

    cpu:          reference, export, simplify, openvino_fp32, openvino_fp16,
                  [(equalize,) calibrate, quantize, openvino_int8,]  bundle
    jetson,
    desktop-gpu:  reference, export, simplify, fp16, [(equalize,) calibrate, quantize, quantize_fp16,]  bundle,
                  then the TensorRT engine step (`stages.tensorrt`: built here with TensorRT and a GPU,
                  else deferred to the device)

The bracketed stages run in INT8 builds only; `equalize` only with `quantization.equalization`. A stage module declares its `Stage` (inputs, parameters,
tools, artifact, check) beside the function that produces it (`stages.base` says what a stage is).
"""

from __future__ import annotations

from pipeline.stages import bundle, calibrate, equalize, export, fp16, openvino, quantize, reference, simplify
from pipeline.stages.base import (GATE_FILE, IMAGES_FILE, IR_FILE, LABELS_FILE, LOGITS_FILE, ONNX_FILE,  # noqa: F401
                                  TABLE_FILE, Stage)
from pipeline.stages.fp16 import FP16_TYPED_STAGES  # noqa: F401
from pipeline.stages.openvino import DEPLOYED_STAGE
from targets import GPU_TARGETS


def stages_for(config) -> list[Stage]:
    """The stage graph of the configured target, in the order it runs."""
    return gpu_stages(config) if config.target in GPU_TARGETS else cpu_stages(config)


def deployed_stage(config) -> str:
    """The stage whose output is deployed: the OpenVINO IR on CPUs, the bundle on GPU targets."""
    return "bundle" if config.target in GPU_TARGETS else DEPLOYED_STAGE[config.precision]


def _common(config) -> list[Stage]:
    return [reference.stage(config), export.stage(config), simplify.stage(config)]


def _int8(config) -> list[Stage]:
    """Calibration and the gated Q/DQ model: the same for every target (the gate also judges OpenVINO)."""
    first = [equalize.stage(config)] if equalize.quantized_source(config) == "equalize" else []
    return first + [calibrate.stage(config), quantize.stage(config)]


def _int8_inputs(config, *stages: str) -> tuple[str, ...]:
    """What the bundle reads of the INT8 stages (the equalized FP32 ONNX too: its fallback variant is quantized from it)."""
    return (("equalize",) if equalize.quantized_source(config) == "equalize" else ()) + stages


def gpu_stages(config) -> list[Stage]:
    """Jetson / desktop GPU: the ONNX models TensorRT builds from, checked in ONNX Runtime, then the bundle."""
    stages = _common(config) + [fp16.fp16_stage(config)]
    inputs = ("reference", "simplify", "fp16")
    if config.precision == "int8":
        stages += _int8(config) + [fp16.quantize_fp16_stage(config)]
        inputs += _int8_inputs(config, "calibrate", "quantize", "quantize_fp16")
    return stages + [bundle.stage(config, inputs)]


def cpu_stages(config) -> list[Stage]:
    """The CPU target: OpenVINO IRs (the INT8 stages for INT8 builds only), then the bundle."""
    ir = openvino.stages(config)
    int8 = config.precision == "int8"
    stages = _common(config) + ir[:2] + (_int8(config) + ir[2:] if int8 else [])
    inputs = ("reference", DEPLOYED_STAGE[config.precision]) + (_int8_inputs(config, "calibrate", "quantize") if int8 else ())
    return stages + [bundle.stage(config, inputs)]
