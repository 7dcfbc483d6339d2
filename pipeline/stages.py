"""The stages of a CPU build, declared as data: name, inputs, parameters, tools, and what each does.

Each `produce` function writes its outputs into the folder it is given (a temporary folder that the
cache renames into place) and returns facts for the manifest. Heavy libraries are imported inside
the functions, so a cached re-run never imports torch or onnxsim.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from pipeline.build import BuildContext
    from pipeline.cache import StageRecord
    from pipeline.runners import Runner

ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"
LOGITS_FILE = "logits.npy"
LABELS_FILE = "labels.npy"
IMAGES_FILE = "images.txt"  # the evaluation images, one path per line, in the order of logits.npy
TABLE_FILE = "calibration.json"
GATE_FILE = "gate.json"


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    inputs: tuple[str, ...]  # upstream stages whose outputs this one reads
    params: dict[str, Any]  # settings that shape the output: part of the cache key
    tools: tuple[str, ...]  # distributions whose versions are part of the cache key
    produce: Callable[["BuildContext", dict[str, "StageRecord"], Path], dict]
    artifact: str  # the main file of the stage's folder
    # How the drift check runs the artifact; None for the reference itself.
    runner: Callable[["BuildContext", "StageRecord"], "Runner"] | None = None
    uses_weights: bool = False  # the checkpoint (or random-weight recipe) is part of the key
    uses_evaluation_images: bool = False
    uses_calibration_images: bool = False
    int8: bool = False  # judged on quantization.evaluation_images with the INT8 budgets
    self_checked: bool = False  # produce already ran the artifact on the evaluation images (logits.npy)
    modules: tuple[str, ...] = ()  # modules whose source is part of the cache key, besides this one
    check_settings: dict[str, Any] = field(default_factory=dict)  # part of the check's cache key


def produce_reference(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Torch FP32 logits on the evaluation images: what every later stage is compared with."""
    from pipeline.runners import TorchRunner

    logits = ctx.predict(TorchRunner(ctx.model.module), ctx.evaluation_count, "reference (torch FP32)")
    np.save(folder / LOGITS_FILE, logits)
    np.save(folder / LABELS_FILE, ctx.evaluation.labels[: len(logits)])
    (folder / IMAGES_FILE).write_text("".join(f"{path}\n" for path in ctx.evaluation.paths[: len(logits)]))
    return {"images": len(logits), "num_classes": int(logits.shape[1])}


def produce_export(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    import onnx
    import torch

    model = ctx.model
    example = torch.zeros(1, 3, model.input_size, model.input_size)
    path = folder / ONNX_FILE
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which cannot give opset 17.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ctx.config.export.opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(str(path))
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset}


def produce_simplify(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    import onnx
    import onnxsim

    source = inputs["export"].path(ONNX_FILE)
    model = onnx.load(str(source))
    nodes_before = len(model.graph.node)
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model against the original")
    onnx.save(simplified, str(folder / ONNX_FILE))
    return {"nodes_before": nodes_before, "nodes_after": len(simplified.graph.node)}


def _produce_ir(precision: str, source: str = "simplify") -> Callable:
    def produce(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
        from targets.openvino import convert_to_ir

        convert_to_ir(inputs[source].path(ONNX_FILE), folder / IR_FILE, precision)
        return {"weights_precision": precision, "converted_from": f"{source}/{ONNX_FILE}"}

    return produce


def produce_calibrate(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Activation ranges of every tensor the Q/DQ model quantizes: the single source of truth."""
    from calibration.statistics import ImageBatches, collect_ranges
    from pipeline.quantize import quantized_activations

    source = inputs["simplify"].path(ONNX_FILE)
    q = ctx.config.quantization
    batches = ImageBatches(ctx.calibration.crops, ctx.preprocessing, ctx.config.data.batch_size)
    table = collect_ranges(source, quantized_activations(source), batches, method=q.method, percentile=q.percentile,
                           bins=q.histogram_bins, threads=ctx.threads, progress=ctx.progress(f"calibrating ({q.method})"))
    table.save(folder / TABLE_FILE)
    return {"method": table.method, "images": table.images, "tensors": len(table.amax),
            "zero_tensors": list(table.zero_tensors)}


def produce_quantize(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """The INT8 Q/DQ ONNX, through the accuracy gate (which writes logits.npy of the final model)."""
    from calibration.statistics import CalibrationTable
    from pipeline.cache import write_json_atomic
    from pipeline.gate import run_gate

    table = CalibrationTable.load(inputs["calibrate"].path(TABLE_FILE))
    gate = run_gate(ctx, inputs["simplify"].path(ONNX_FILE), table.amax, inputs["reference"], folder / ONNX_FILE)
    write_json_atomic(folder / GATE_FILE, gate)
    return {"excluded_layers": gate["excluded_layers"], "placement": gate["placement"]}


def _onnx_runner(ctx: "BuildContext", record: "StageRecord") -> "Runner":
    from pipeline.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(record.path(ONNX_FILE), threads=ctx.threads)


def _openvino_runner(hint: str | None) -> Callable:
    def make(ctx: "BuildContext", record: "StageRecord") -> "Runner":
        from targets.openvino import OpenVinoRunner

        return OpenVinoRunner(record.path(IR_FILE), inference_precision=hint, threads=ctx.threads)

    return make


def cpu_stages(config) -> list[Stage]:
    """The CPU target's stage graph, in the order it runs (the INT8 stages for INT8 builds only)."""
    deployed_hint = None if config.openvino.inference_precision == "auto" else config.openvino.inference_precision
    q = config.quantization
    gate_budgets = {name: config.budget(name, random, labelled).as_dict()
                    for name in ("quantize", "openvino_int8") for random in (False, True) for labelled in (False, True)}
    int8 = [
        Stage("calibrate", "activation ranges on calibration images", ("simplify",),
              {"method": q.method, "percentile": q.percentile, "bins": q.histogram_bins}, ("onnxruntime", "numpy"),
              produce_calibrate, TABLE_FILE, uses_calibration_images=True,
              modules=("calibration.statistics", "pipeline.quantize")),
        Stage("quantize", "INT8 Q/DQ ONNX from the calibration table, accuracy gate with fallback",
              ("simplify", "calibrate", "reference"),
              {"evaluation_images": q.evaluation_images, "sensitivity_images": q.sensitivity_images,
               "max_fallback_layers": q.max_fallback_layers, "fallback_group": q.fallback_group,
               "budgets": gate_budgets, "openvino_inference_precision": config.openvino.inference_precision},
              ("onnxruntime", "onnx", "openvino"), produce_quantize, ONNX_FILE, runner=_onnx_runner,
              uses_calibration_images=True, int8=True, self_checked=True,
              modules=("pipeline.gate", "pipeline.quantize", "pipeline.sensitivity", "targets.openvino")),
        Stage("openvino_int8", "OpenVINO IR converted from the Q/DQ ONNX", ("quantize",), {"precision": "fp32"},
              ("openvino",), _produce_ir("fp32", source="quantize"), IR_FILE, runner=_openvino_runner(deployed_hint),
              int8=True, check_settings={"inference_precision": config.openvino.inference_precision},
              modules=("targets.openvino",)),
    ]
    return [
        Stage("reference", "torch FP32 logits on the evaluation images", (), {}, ("torch",),
              produce_reference, LOGITS_FILE, uses_weights=True, uses_evaluation_images=True,
              modules=("pipeline.runners",)),
        Stage("export", "torch -> ONNX (TorchScript exporter)", (), {"opset": config.export.opset}, ("torch", "onnx"),
              produce_export, ONNX_FILE, runner=_onnx_runner, uses_weights=True, modules=("pipeline.runners",)),
        Stage("simplify", "ONNX -> simplified ONNX (onnxsim)", ("export",), {}, ("onnx", "onnxsim"),
              produce_simplify, ONNX_FILE, runner=_onnx_runner, modules=("pipeline.runners",)),
        Stage("openvino_fp32", "OpenVINO IR, FP32 weights (checked pinned to f32)", ("simplify",), {"precision": "fp32"},
              ("openvino",), _produce_ir("fp32"), IR_FILE, runner=_openvino_runner("f32"),
              check_settings={"inference_precision": "f32"}),
        Stage("openvino_fp16", "OpenVINO IR, FP16 weights", ("simplify",), {"precision": "fp16"},
              ("openvino",), _produce_ir("fp16"), IR_FILE, runner=_openvino_runner(deployed_hint),
              check_settings={"inference_precision": config.openvino.inference_precision}),
    ] + (int8 if config.precision == "int8" else [])


DEPLOYED_STAGE = {"fp32": "openvino_fp32", "fp16": "openvino_fp16", "int8": "openvino_int8"}
