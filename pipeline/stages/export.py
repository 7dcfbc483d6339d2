"""The export stage: the torch module to ONNX with the TorchScript exporter (opset 17; dynamo cannot give it)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.base import ONNX_CHECK_MODULES, ONNX_FILE, Stage, onnx_runner

if TYPE_CHECKING:
    from pipeline.context import BuildContext


def stage(config) -> Stage:
    return Stage("export", "torch -> ONNX (TorchScript exporter); your ONNX file: renamed, batch axis dynamic", (), {"opset": config.export.opset}, ("torch", "onnx"),
                 produce_export, ONNX_FILE, runner=onnx_runner, uses_weights=True, modules=ONNX_CHECK_MODULES)


def produce_export(ctx: "BuildContext", inputs: dict, folder: Path) -> dict:
    """Our network or your module exported; your ONNX file normalised (`pipeline.models.onnx_file`)."""
    if ctx.source.kind == "onnx":
        from pipeline.models.onnx_file import inspect, normalise

        info = inspect(ctx.source.path, ctx.model_input.layout)
        return normalise(info, ctx.model_input.channels, folder / ONNX_FILE, ctx.config.export.opset, ctx.threads,
                         ctx.preprocessing.crop)
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
