"""The stages of a build, declared as data: name, inputs, parameters, tools, and what each does.

`stages_for(config)` picks the target's graph: `cpu_stages` (OpenVINO IRs) or `gpu_stages` (the
ONNX models a TensorRT engine is built from on the device); both end in the `bundle` stage.

Each `produce` function writes its outputs into the folder it is given (a temporary folder that the
cache renames into place) and returns facts for the manifest. Heavy libraries are imported inside
the functions, so a cached re-run never imports torch or onnxsim.
"""

from __future__ import annotations

import dataclasses
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
FP16_TYPED_STAGES = ("fp16", "quantize_fp16")  # ONNX Runtime runs their ONNX right only with optimizations off
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
    paths = (Path(path).resolve() for path in ctx.evaluation.paths[: len(logits)])  # absolute: reports run from anywhere
    (folder / IMAGES_FILE).write_text("".join(f"{path}\n" for path in paths))
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


def produce_fp16(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    from pipeline.fp16 import write_fp16_model

    return write_fp16_model(inputs["simplify"].path(ONNX_FILE), folder / ONNX_FILE)


def produce_quantize_fp16(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """The gated Q/DQ model, FP16-typed for strongly typed TensorRT (same layers in float)."""
    from pipeline.fp16 import write_fp16_qdq_model

    return write_fp16_qdq_model(inputs["quantize"].path(ONNX_FILE), folder / ONNX_FILE)


def produce_bundle(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    from pipeline.bundle import write_bundle

    return write_bundle(ctx, inputs, folder)


def _onnx_runner(ctx: "BuildContext", record: "StageRecord") -> "Runner":
    from pipeline.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(record.path(ONNX_FILE), threads=ctx.threads)


def _fp16_onnx_runner(ctx: "BuildContext", record: "StageRecord") -> "Runner":
    """FP16-typed ONNX on the host's CPU, optimizations off (the only way ONNX Runtime computes it right)."""
    from pipeline.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(record.path(ONNX_FILE), threads=ctx.threads, optimize=False)
    runner.execution_precision = "fp16 (host proxy)"
    return runner


def _openvino_runner(hint: str | None) -> Callable:
    def make(ctx: "BuildContext", record: "StageRecord") -> "Runner":
        from targets.openvino import OpenVinoRunner

        return OpenVinoRunner(record.path(IR_FILE), inference_precision=hint, threads=ctx.threads)

    return make


def stages_for(config) -> list[Stage]:
    """The stage graph of the configured target."""
    from pipeline.config import GPU_TARGETS

    return gpu_stages(config) if config.target in GPU_TARGETS else cpu_stages(config)


def deployed_stage(config) -> str:
    """The stage whose output is deployed: the OpenVINO IR on CPUs, the bundle on GPU targets."""
    from pipeline.config import GPU_TARGETS

    return "bundle" if config.target in GPU_TARGETS else DEPLOYED_STAGE[config.precision]


def _reference_export_simplify(config) -> list[Stage]:
    return [
        Stage("reference", "torch FP32 logits on the evaluation images", (), {}, ("torch",),
              produce_reference, LOGITS_FILE, uses_weights=True, uses_evaluation_images=True,
              modules=("pipeline.runners",)),
        Stage("export", "torch -> ONNX (TorchScript exporter)", (), {"opset": config.export.opset}, ("torch", "onnx"),
              produce_export, ONNX_FILE, runner=_onnx_runner, uses_weights=True, modules=("pipeline.runners",)),
        Stage("simplify", "ONNX -> simplified ONNX (onnxsim)", ("export",), {}, ("onnx", "onnxsim"),
              produce_simplify, ONNX_FILE, runner=_onnx_runner, modules=("pipeline.runners",)),
    ]


def _budget_variants(config, stages: tuple[str, ...]) -> dict[str, dict]:
    """Every budget these stages may be judged on (weights real or random, images labelled or not): a cache key part."""
    return {f"{name}/{'random' if random else 'trained'}/{'labelled' if labelled else 'unlabelled'}":
            config.budget(name, random, labelled).as_dict()
            for name in stages for random in (False, True) for labelled in (False, True)}


def _int8_stages(config) -> list[Stage]:
    """Calibration and the gated Q/DQ model: the same for every target (the gate also judges OpenVINO)."""
    q = config.quantization
    gate_budgets = _budget_variants(config, ("quantize", "openvino_int8"))
    return [
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
    ]


def bundle_stage(config, inputs: tuple[str, ...]) -> Stage:
    """The self-verifying bundle; its key covers the project's source (the bundled wheel) and the options."""
    from pipeline.bundle import project_source_digest
    from pipeline.config import GPU_TARGETS

    kind = "gpu" if config.target in GPU_TARGETS else "cpu"
    # The precision OpenVINO runs the bundled IR in (the FP32 IR always f32); GPU bundles have no IR.
    hint = None if kind == "gpu" else "f32" if config.precision == "fp32" else config.openvino.inference_precision
    return Stage("bundle", "self-verifying bundle: models, golden data, budgets, expected accuracy, wheel",
                 inputs, {"golden_images": config.bundle.golden_images, "include_wheel": config.bundle.include_wheel,
                          "target": config.target, "precision": config.precision,
                          "tensorrt": dataclasses.asdict(config.tensorrt),
                          "budgets": _budget_variants(config, tuple(BUNDLE_BUDGET_STAGE[kind].values())
                                                      + (tuple(ENGINE_BUDGET_STAGE.values()) if kind == "gpu" else ())),
                          "openvino_inference_precision": hint,
                          "labels": _labels_identity(config), "project_source": project_source_digest()},
                 ("onnxruntime", "onnx", "openvino", "pip", "setuptools"), produce_bundle, "manifest.json",
                 uses_evaluation_images=True,
                 modules=("pipeline.bundle", "pipeline.artifact", "pipeline.runners", "pipeline.fp16", "pipeline.quantize"))


def _labels_identity(config) -> str:
    """The class names the bundle's labels.txt holds: the user's file (by content) or ImageNet's."""
    from pipeline.cache import sha256_file

    path = Path(config.network.labels) if config.network.labels else None
    return sha256_file(path) if path is not None and path.is_file() else config.network.labels or "imagenet synsets"


# The stage whose budget each precision is judged on, per target (what the device is judged on too).
BUNDLE_BUDGET_STAGE = {
    "cpu": {"fp32": "openvino_fp32", "fp16": "openvino_fp16", "int8": "openvino_int8"},
    "gpu": {"fp32": "simplify", "fp16": "fp16", "int8": "quantize"},
}
# What a GPU bundle's engines are judged on by device-build: TensorRT's own budgets (its FP32 engines use
# TF32 on Ampere and later, so the ONNX stages' lossless budget would be too strict).
ENGINE_BUDGET_STAGE = {"fp32": "tensorrt_fp32", "fp16": "tensorrt_fp16", "int8": "tensorrt_int8"}


def gpu_stages(config) -> list[Stage]:
    """Jetson / desktop GPU: the ONNX models TensorRT builds from, checked in ONNX Runtime, then the bundle."""
    fp16 = Stage("fp16", "FP16 ONNX (float32 input/output), checked in ONNX Runtime on the CPU (host proxy)",
                 ("simplify",), {"keep_io_types": True}, ("onnx", "onnxconverter-common"), produce_fp16, ONNX_FILE,
                 runner=_fp16_onnx_runner, check_settings={"graph_optimizations": "off"},
                 modules=("pipeline.fp16", "pipeline.runners"))
    stages = _reference_export_simplify(config) + [fp16]
    inputs = ("reference", "simplify", "fp16")
    if config.precision == "int8":
        quantize_fp16 = Stage("quantize_fp16", "FP16-typed Q/DQ ONNX (opset 19) for strongly typed TensorRT",
                              ("quantize",), {"keep_io_types": True}, ("onnx", "onnxconverter-common"),
                              produce_quantize_fp16, ONNX_FILE, runner=_fp16_onnx_runner, int8=True,
                              check_settings={"graph_optimizations": "off"},
                              modules=("pipeline.fp16", "pipeline.runners"))
        stages += _int8_stages(config) + [quantize_fp16]
        inputs += ("calibrate", "quantize", "quantize_fp16")
    return stages + [bundle_stage(config, inputs)]


def cpu_stages(config) -> list[Stage]:
    """The CPU target's stage graph, in the order it runs (the INT8 stages for INT8 builds only)."""
    deployed_hint = None if config.openvino.inference_precision == "auto" else config.openvino.inference_precision
    int8 = _int8_stages(config) + [
        Stage("openvino_int8", "OpenVINO IR converted from the Q/DQ ONNX", ("quantize",), {"precision": "fp32"},
              ("openvino",), _produce_ir("fp32", source="quantize"), IR_FILE, runner=_openvino_runner(deployed_hint),
              int8=True, check_settings={"inference_precision": config.openvino.inference_precision},
              modules=("targets.openvino",)),
    ]
    stages = _reference_export_simplify(config) + [
        Stage("openvino_fp32", "OpenVINO IR, FP32 weights (checked pinned to f32)", ("simplify",), {"precision": "fp32"},
              ("openvino",), _produce_ir("fp32"), IR_FILE, runner=_openvino_runner("f32"),
              check_settings={"inference_precision": "f32"}),
        Stage("openvino_fp16", "OpenVINO IR, FP16 weights", ("simplify",), {"precision": "fp16"},
              ("openvino",), _produce_ir("fp16"), IR_FILE, runner=_openvino_runner(deployed_hint),
              check_settings={"inference_precision": config.openvino.inference_precision}),
    ] + (int8 if config.precision == "int8" else [])
    deployed = DEPLOYED_STAGE[config.precision]
    inputs = ("reference", deployed) + (("calibrate", "quantize") if config.precision == "int8" else ())
    return stages + [bundle_stage(config, inputs)]


DEPLOYED_STAGE = {"fp32": "openvino_fp32", "fp16": "openvino_fp16", "int8": "openvino_int8"}
