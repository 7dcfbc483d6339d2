"""The reference stage: torch FP32 logits on the evaluation images, what every later stage is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.stages.base import IMAGES_FILE, LABELS_FILE, LOGITS_FILE, Stage

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    return Stage("reference", "torch FP32 logits on the evaluation images", (), {}, ("torch",),
                 produce_reference, LOGITS_FILE, uses_weights=True, uses_evaluation_images=True,
                 modules=("targets.runner", "targets.pytorch", "pipeline.executor.work"))


def produce_reference(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Torch FP32 logits on the evaluation images: what every later stage is compared with."""
    from pipeline.executor.work import RunnerSpec

    predictions = ctx.evaluate(RunnerSpec("torch", module=ctx.model.module), ctx.evaluation_count,
                               "reference (torch FP32)")
    logits = predictions.logits
    np.save(folder / LOGITS_FILE, logits)
    np.save(folder / LABELS_FILE, predictions.labels)
    paths = (Path(path).resolve() for path in predictions.paths)  # absolute: reports run from anywhere
    (folder / IMAGES_FILE).write_text("".join(f"{path}\n" for path in paths))
    return {"images": len(logits), "num_classes": int(logits.shape[1])}
