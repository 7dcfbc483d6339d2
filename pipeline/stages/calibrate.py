"""The calibrate stage: activation ranges of every tensor the Q/DQ model quantizes, on calibration images.

The table it writes is the single source of truth for every INT8 artifact (Q/DQ ONNX, OpenVINO INT8
IR, the TensorRT calibration cache written on the device).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import ONNX_FILE, TABLE_FILE, Stage
from pipeline.stages.equalize import quantized_source

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    q = config.quantization
    return Stage("calibrate", "activation ranges on calibration images", (quantized_source(config),),
                 {"method": q.method, "percentile": q.percentile, "bins": q.histogram_bins, "dla": for_dla(config),
                  "residual_adds": q.residual_adds, "int8_head": q.int8_head},
                 ("onnxruntime", "numpy"), produce_calibrate, TABLE_FILE, uses_calibration_images=True,
                 modules=("calibration.statistics", "calibration.thresholds", "pipeline.stages.quantize.qdq",
                          "pipeline.stages.quantize.residual", "pipeline.stages.quantize.head",
                          "pipeline.stages.quantize.dla",
                          "targets.onnxruntime", "pipeline.executor.work"))


def for_dla(config) -> bool:
    """Jetson builds also calibrate every tensor DLA may run in INT8 (Orin's DLA; desktop GPUs have none)."""
    return config.target == "jetson"


def produce_calibrate(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Activation ranges of every tensor the Q/DQ model quantizes: the single source of truth."""
    from dataclasses import replace

    from pipeline.stages.quantize.dla import dla_tensors, shared_ranges
    from pipeline.stages.quantize.qdq import quantized_activations

    source = inputs[quantized_source(ctx.config)].path(ONNX_FILE)
    q = ctx.config.quantization
    tensors, dla = quantized_activations(source, residual_adds=q.residual_adds, int8_head=q.int8_head), None
    if for_dla(ctx.config):  # the same table then gives the Q/DQ ONNX and the DLA calibration cache
        share = shared_ranges(source)
        dla = {"tensors": list(dict.fromkeys(dla_tensors(source) + list(share))), "share": share}
        tensors = list(dict.fromkeys(tensors + dla["tensors"] + list(share.values())))
    # Locally one pass over the decoded images; on Ray, statistics per shard, merged (pipeline/executor/).
    table, skipped = ctx.executor.calibrate(source, tensors, ctx.images("calibration"), ctx.preprocessing,
                                            ctx.threads, method=q.method, percentile=q.percentile,
                                            bins=q.histogram_bins)
    ctx.record_skipped("calibration", skipped)
    table = replace(table, dla=dla)
    table.save(folder / TABLE_FILE)
    return {"method": table.method, "images": table.images, "tensors": len(table.amax),
            "zero_tensors": list(table.zero_tensors), "dla_tensors": len(dla["tensors"]) if dla else 0}
