"""The calibrate stage: activation ranges of every tensor the Q/DQ model quantizes, on calibration images.

The table it writes is the single source of truth for every INT8 artifact (Q/DQ ONNX, OpenVINO INT8
IR, the TensorRT calibration cache written on the device).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import ONNX_FILE, TABLE_FILE, Stage

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    q = config.quantization
    return Stage("calibrate", "activation ranges on calibration images", ("simplify",),
                 {"method": q.method, "percentile": q.percentile, "bins": q.histogram_bins}, ("onnxruntime", "numpy"),
                 produce_calibrate, TABLE_FILE, uses_calibration_images=True,
                 modules=("calibration.statistics", "pipeline.stages.quantize.qdq", "targets.onnxruntime"))


def produce_calibrate(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Activation ranges of every tensor the Q/DQ model quantizes: the single source of truth."""
    from calibration.statistics import ImageBatches, collect_ranges
    from pipeline.stages.quantize.qdq import quantized_activations

    source = inputs["simplify"].path(ONNX_FILE)
    q = ctx.config.quantization
    batches = ImageBatches(ctx.calibration.crops, ctx.preprocessing, ctx.config.data.batch_size)
    table = collect_ranges(source, quantized_activations(source), batches, method=q.method, percentile=q.percentile,
                           bins=q.histogram_bins, threads=ctx.threads, progress=ctx.progress(f"calibrating ({q.method})"))
    table.save(folder / TABLE_FILE)
    return {"method": table.method, "images": table.images, "tensors": len(table.amax),
            "zero_tensors": list(table.zero_tensors)}
