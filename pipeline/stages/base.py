"""What a stage is: name, inputs, parameters, tools, the function that produces its outputs, and how
its artifact is checked. Every stage module declares its `Stage` beside its `produce` function; the
graph (`pipeline.stages`) strings them together per target.

Each `produce` function writes its outputs into the folder it is given (a temporary folder that the
cache renames into place) and returns facts for the manifest. Heavy libraries are imported inside
the functions, so a cached re-run never imports torch or onnxsim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.layout import (GATE_FILE, IMAGES_FILE, IR_FILE, LABELS_FILE, LOGITS_FILE, ONNX_FILE,  # noqa: F401
                             TABLE_FILE)

if TYPE_CHECKING:
    from pipeline.cache import StageRecord
    from pipeline.executor.work import RunnerSpec

# What a stage's functions receive: a `pipeline.context.BuildContext`. Named, not imported: the stage
# modules sit below the context in the layering (the context never imports a stage).
Context = Any

# Every check of an ONNX stage runs its artifact through targets.onnxruntime.
ONNX_CHECK_MODULES = ("targets.runner", "targets.onnxruntime", "pipeline.executor.work")


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    inputs: tuple[str, ...]  # upstream stages whose outputs this one reads
    params: dict[str, Any]  # settings that shape the output: part of the cache key
    tools: tuple[str, ...]  # distributions whose versions are part of the cache key
    produce: Callable[["Context", dict[str, "StageRecord"], Path], dict]
    artifact: str  # the main file of the stage's folder
    # How the drift check opens the artifact (a picklable `pipeline.executor.work.RunnerSpec`, so a Ray worker
    # can open it too); None for the reference itself.
    runner: Callable[["Context", "StageRecord"], "RunnerSpec"] | None = None
    uses_weights: bool = False  # the checkpoint (or random-weight recipe) is part of the key
    uses_evaluation_images: bool = False
    uses_calibration_images: bool = False
    uses_decision_images: bool = False  # the INT8 gate's train-sample/ images (pipeline.context.decision)
    int8: bool = False  # judged on quantization.evaluation_images with the INT8 budgets
    self_checked: bool = False  # produce already ran the artifact on the evaluation images (logits.npy)
    modules: tuple[str, ...] = ()  # modules whose source is part of the cache key, besides this one
    check_settings: dict[str, Any] = field(default_factory=dict)  # part of the check's cache key


def onnx_runner(ctx: "Context", record: "StageRecord") -> "RunnerSpec":
    """How the drift check runs an ONNX stage's model: ONNX Runtime on the host's CPU."""
    from pipeline.executor.work import onnxruntime_spec

    return onnxruntime_spec(record.path(ONNX_FILE), ctx.threads)


def fp16_onnx_runner(ctx: "Context", record: "StageRecord") -> "RunnerSpec":
    """An FP16-typed ONNX on the host's CPU (a proxy for the GPU), graph optimizations off."""
    from pipeline.executor.work import onnxruntime_spec

    return onnxruntime_spec(record.path(ONNX_FILE), ctx.threads, fp16_typed=True)


def budget_variants(config, stages: tuple[str, ...]) -> dict[str, dict]:
    """Every budget these stages may be judged on (weights real or random, images labelled or not): a cache key part."""
    return {f"{name}/{'random' if random else 'trained'}/{'labelled' if labelled else 'unlabelled'}":
            config.budget(name, random, labelled).as_dict()
            for name in stages for random in (False, True) for labelled in (False, True)}
