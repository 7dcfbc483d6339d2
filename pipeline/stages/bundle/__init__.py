"""Writes the self-verifying bundle (`build/<model>/<target>/bundle/`), the last stage of every build.

The layout and the manifest keys are `pipeline.artifact`'s (the reader); this module is the writer.
It runs on the build host only. The golden images are the first N evaluation images, so their torch
reference logits are a prefix of the reference stage's, and the logits that the drift checks already
computed (check_<stage>/logits.npy, quantize/logits.npy) are reused wherever they cover them.

`tolerance[precision].max_abs` is the largest |logit - reference| that ONNX Runtime (OpenVINO for the
CPU IR) gave on the golden images here, with a margin: running the bundled model on the same inputs
reproduces the golden reference within it. Other back ends (TensorRT) are judged on `budgets`.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.artifact import (BUNDLE_FORMAT, GOLDEN_INPUTS, GOLDEN_INTERMEDIATES, GOLDEN_LABELS, GOLDEN_REFERENCE,
                               MANIFEST, sha256_file)
from pipeline.layout import LABELS
from pipeline.stages.base import LOGITS_FILE, ONNX_FILE, Stage, budget_variants
from pipeline.stages.bundle.golden import INTERMEDIATE_IMAGES, Golden, write_intermediates
from pipeline.stages.bundle.models import CALIBRATION, MODELS, cpu_model, gpu_models
from pipeline.stages.bundle.package import (TRTEXEC, WHEEL_DIR, distribution_version, project_source_digest, readme,
                                            tensorrt_options, trtexec_lines, write_json, write_wheel)
from targets import GPU_TARGETS

if TYPE_CHECKING:
    from pipeline.context import BuildContext
    from pipeline.cache import StageRecord

# The stage whose budget each precision is judged on, per target (what the device is judged on too).
BUNDLE_BUDGET_STAGE = {
    "cpu": {"fp32": "openvino_fp32", "fp16": "openvino_fp16", "int8": "openvino_int8"},
    "gpu": {"fp32": "simplify", "fp16": "fp16", "int8": "quantize"},
}

# What a GPU bundle's engines are judged on by device-build: TensorRT's own budgets (its FP32 engines use
# TF32 on Ampere and later, so the ONNX stages' lossless budget would be too strict).
ENGINE_BUDGET_STAGE = {"fp32": "tensorrt_fp32", "fp16": "tensorrt_fp16", "int8": "tensorrt_int8"}


def stage(config, inputs: tuple[str, ...]) -> Stage:
    """The self-verifying bundle; its key covers the project's source (the bundled wheel) and the options."""
    from targets.openvino import inference_precision

    kind = "gpu" if config.target in GPU_TARGETS else "cpu"
    # The precision OpenVINO runs the bundled IR in; GPU bundles have no IR.
    hint = None if kind == "gpu" else inference_precision(config.precision, config.openvino.inference_precision)
    return Stage("bundle", "self-verifying bundle: models, golden data, budgets, expected accuracy, wheel",
                 inputs, {"golden_images": config.bundle.golden_images, "include_wheel": config.bundle.include_wheel,
                          "target": config.target, "precision": config.precision,
                          "tensorrt": dataclasses.asdict(config.tensorrt),
                          "budgets": budget_variants(config, tuple(BUNDLE_BUDGET_STAGE[kind].values())
                                                     + (tuple(ENGINE_BUDGET_STAGE.values()) if kind == "gpu" else ())),
                          "openvino_inference_precision": hint,
                          "labels": _labels_identity(config), "project_source": project_source_digest()},
                 ("onnxruntime", "onnx", "openvino", "pip", "setuptools"), write_bundle, MANIFEST,
                 uses_evaluation_images=True,
                 modules=("pipeline.stages.bundle.golden", "pipeline.stages.bundle.models",
                          "pipeline.stages.bundle.package", "pipeline.artifact", "targets.runner",
                          "targets.onnxruntime", "pipeline.stages.fp16", "pipeline.stages.quantize.qdq",
                          "pipeline.stages.quantize.unsigned", "pipeline.stages.quantize.overflow",
                          "pipeline.stages.quantize.options", "targets.cpu_features"))


def _labels_identity(config) -> str:
    """The class names the bundle's labels.txt holds: the user's file (by content) or ImageNet's."""
    from pipeline.cache import sha256_file

    path = Path(config.network.labels) if config.network.labels else None
    return sha256_file(path) if path is not None and path.is_file() else config.network.labels or "imagenet synsets"


def write_bundle(ctx: "BuildContext", inputs: dict[str, "StageRecord"], folder: Path) -> dict:
    """Fill `folder` (the bundle stage's temporary folder) and return the stage's facts."""
    from pipeline import __version__

    config = ctx.config
    gpu = config.target in GPU_TARGETS
    reference = inputs["reference"]
    all_reference = np.load(reference.path(LOGITS_FILE))
    count = min(config.bundle.golden_images, len(all_reference))
    golden_reference = np.ascontiguousarray(all_reference[:count], dtype=np.float32)
    labels = ctx.labels(reference)[:count].astype(np.int64)
    crops = np.ascontiguousarray(ctx.evaluation_head(count).crops)
    labelled = bool((labels >= 0).any())

    (folder / "golden").mkdir()
    (folder / MODELS).mkdir()
    np.save(folder / GOLDEN_INPUTS, crops)
    np.save(folder / GOLDEN_LABELS, labels)
    np.save(folder / GOLDEN_REFERENCE, golden_reference)
    shutil.copyfile(ctx.root / LABELS, folder / LABELS)

    golden = Golden(ctx, crops, golden_reference, labels)
    if gpu:
        artifacts, measured = gpu_models(ctx, inputs, folder, golden)
    else:
        artifacts, measured = cpu_model(ctx, inputs, folder, golden)
    if "calibrate" in inputs:
        shutil.copyfile(inputs["calibrate"].path(CALIBRATION), folder / CALIBRATION)

    stage_of = BUNDLE_BUDGET_STAGE["gpu" if gpu else "cpu"]
    budgets, expected, tolerance = {}, {}, {}
    for precision, (logits, source, variants) in measured.items():
        budget = config.budget(stage_of[precision], ctx.random_weights, labelled)
        device_budget = config.budget(ENGINE_BUDGET_STAGE[precision], ctx.random_weights, labelled) if gpu else budget
        budgets[precision] = device_budget.as_dict()
        result = golden.compare(stage_of[precision], logits, budget)
        expected[precision] = {"top1": result.top1, "top5": result.top5, "agreement": result.agreement,
                               "ref_top1": result.ref_top1, "ref_top5": result.ref_top5, "images": result.images,
                               "labelled_images": result.labelled_images, "cosine": result.cosine,
                               "source": source, "host_proxy": precision == "fp16",
                               "budget_stage": stage_of[precision], "within_budget": result.passed}
        tolerance[precision] = {"max_abs": golden.tolerance(logits),
                                "variants": {file: golden.tolerance(v) for file, v in variants.items()}}

    intermediates = None
    if gpu:
        intermediates = write_intermediates(inputs["simplify"].path(ONNX_FILE),
                                            ctx.preprocessing.normalize(crops[:INTERMEDIATE_IMAGES]),
                                            folder / GOLDEN_INTERMEDIATES, ctx.threads)

    manifest = {
        "format": BUNDLE_FORMAT,
        "pipeline_version": __version__,
        "model": ctx.model_name,
        "target": config.target,
        "precision": config.precision,
        "random_weights": ctx.random_weights,
        "labelled": labelled,
        "input": {"name": "input", "layout": "NCHW", "size": ctx.preprocessing.crop, "dtype": "float32"},
        "output": {"name": "logits", "classes": int(golden_reference.shape[1])},
        "preprocessing": ctx.preprocessing.as_dict(),
        "model_input": ctx.model_input.as_dict(),  # what the network itself takes: folded into the models above
        "labels": "labels.txt",
        "golden": {"images": count, "inputs": GOLDEN_INPUTS, "labels": GOLDEN_LABELS, "reference": GOLDEN_REFERENCE,
                   "intermediates": GOLDEN_INTERMEDIATES if intermediates else None,
                   "intermediate_tensors": intermediates or [],
                   "intermediate_images": INTERMEDIATE_IMAGES if intermediates else 0,
                   "selection": "the first N evaluation images (ImageNet val/, balanced, seeded)"},
        "artifacts": artifacts,
        "budgets": budgets,
        "expected": expected,
        "tolerance": tolerance,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
                 "onnxruntime": distribution_version("onnxruntime"), "openvino": distribution_version("openvino")},
    }
    if gpu:
        manifest["tensorrt"] = tensorrt_options(config)
    if "calibrate" in inputs:
        from pipeline.stages.quantize.overflow import overflow_fix

        manifest["calibration"] = CALIBRATION
        # verify names the cause when a CPU without VNNI saturates an IR built without the fix
        manifest["int8"] = {"overflow_fix": overflow_fix(config)}
    manifest["wheel"], wheel_note = write_wheel(folder / WHEEL_DIR) if config.bundle.include_wheel else (None, "bundle.include_wheel is off")
    if wheel_note:
        manifest["wheel_note"] = wheel_note
    manifest["trtexec"], trtexec_note = trtexec_lines(manifest) if gpu else ([], "")
    if trtexec_note:
        manifest["trtexec_note"] = trtexec_note
    if manifest["trtexec"]:
        (folder / TRTEXEC).write_text("\n".join(manifest["trtexec"]) + "\n")
    (folder / "README.md").write_text(readme(manifest))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        path.chmod(0o644)  # some writers make private temp files; a bundle is meant to be copied
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    manifest["sizes"] = {str(p.relative_to(folder)): p.stat().st_size for p in files}
    write_json(folder / MANIFEST, manifest)  # last: the bundle's completion marker
    return {"golden_images": count, "precisions": list(artifacts), "expected": expected,
            "wheel": manifest["wheel"], "trtexec_lines": len(manifest["trtexec"])}
