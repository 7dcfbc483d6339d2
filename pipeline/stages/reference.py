"""The reference stage: torch FP32 logits on the evaluation images, what every later stage is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.stages.base import IMAGES_FILE, LABELS_FILE, LOGITS_FILE, Stage

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    return Stage("reference", "FP32 logits on the evaluation images (torch; ONNX Runtime for an ONNX file)", (), {},
                 ("torch", "onnxruntime"), produce_reference, LOGITS_FILE, uses_weights=True, uses_evaluation_images=True,
                 modules=("targets.runner", "targets.pytorch", "targets.onnxruntime", "pipeline.executor.work"))


def produce_reference(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """FP32 logits on the evaluation images: what every later stage is compared with."""
    spec = ctx.reference_spec()
    what = "reference (ONNX Runtime FP32, your ONNX file)" if spec.backend == "onnx_file" else "reference (torch FP32)"
    predictions = ctx.evaluate(spec, ctx.evaluation_count, what)
    logits = predictions.logits
    np.save(folder / LOGITS_FILE, logits)
    np.save(folder / LABELS_FILE, predictions.labels)
    paths = (Path(path).resolve() for path in predictions.paths)  # absolute: reports run from anywhere
    (folder / IMAGES_FILE).write_text("".join(f"{path}\n" for path in paths))
    return {"images": len(logits), "num_classes": int(logits.shape[1]), "runner": predictions.runner}
