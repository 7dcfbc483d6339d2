"""The equalize stage (INT8 builds with `quantization.equalization`): cross-layer equalization of the
simplified FP32 ONNX, before calibration. The rewrite is exact (`pipeline.stages.quantize.equalization`
leaves the pairs through a ReLU6 as they are), so the stage is judged on the lossless budget, like
`simplify`: its drift check proves that the equalized graph still computes the reference. The INT8
stages then calibrate and quantize this graph (`quantized_source`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import ONNX_CHECK_MODULES, ONNX_FILE, Stage, onnx_runner

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    return Stage("equalize", "cross-layer equalization of the FP32 ONNX (exact pairs only)", ("simplify",), {},
                 ("onnx", "numpy"), produce_equalize, ONNX_FILE, runner=onnx_runner,
                 modules=ONNX_CHECK_MODULES + ("pipeline.stages.quantize.equalization",))


def quantized_source(config) -> str:
    """The stage whose FP32 ONNX the INT8 stages calibrate and quantize: `equalize` when it runs, else `simplify`."""
    return "equalize" if config.precision == "int8" and config.quantization.equalization else "simplify"


def produce_equalize(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    from pipeline.stages.quantize.equalization import write_equalized_model

    summary = write_equalized_model(inputs["simplify"].path(ONNX_FILE), folder / ONNX_FILE)
    skipped = sum(len(pairs) for pairs in summary.skipped.values())
    ctx.reporter.say(f"  equalized {len(summary.equalized)} conv pairs, left {skipped} as they were"
                     + "".join(f"; {len(pairs)}: {reason}" for reason, pairs in summary.skipped.items()))
    return summary.as_dict()
