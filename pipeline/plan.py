"""The build plan: what one build makes and where, resolved once from the configuration.

Model, target, precision, the build folder, the stage graph and the deployed stage are decided here;
the builder, the build context, the CLI's `build`/`stages`/`clean`, the benchmark and the report
read them from a plan instead of deciding again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.config import Config
from pipeline.layout import build_root
from targets import GPU_TARGETS


@dataclass(frozen=True)
class BuildPlan:
    config: Config
    model: str  # a --model argument: a registered network, a .onnx file or package.module:function

    @cached_property
    def source(self):
        """What `model` is (`pipeline.models.source`); its name is the build folder's."""
        from pipeline.models.source import resolve_model

        return resolve_model(self.model)

    @property
    def target(self) -> str:
        return self.config.target

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def gpu(self) -> bool:
        """A TensorRT target (the engine is built on the device) rather than the OpenVINO CPU target."""
        return self.target in GPU_TARGETS

    @property
    def root(self) -> Path:
        return build_root(self.config.build_dir, self.source.name, self.target)

    @cached_property
    def stages(self) -> list:
        from pipeline.stages import stages_for

        return stages_for(self.config)

    @property
    def deployed_stage(self) -> str:
        from pipeline.stages import deployed_stage

        return deployed_stage(self.config)

    def check_images(self, stage) -> int:
        """Evaluation images a stage's drift check runs on: the INT8 count for INT8 stages."""
        return self.config.quantization.evaluation_images if stage.int8 else self.config.data.evaluation_images

    @cached_property
    def evaluation_count(self) -> int:
        """Evaluation images the reference runs on: the most any check needs (smaller checks use a
        prefix of them; balanced selection is prefix-stable)."""
        return max(self.check_images(stage) for stage in self.stages if stage.runner is not None)

    @property
    def random_weights(self) -> bool:
        return self.config.weights == "random"

    def budget(self, stage: str, labelled: bool):
        """The drift budget `stage` is judged on in this build (random weights or not, labels or not)."""
        return self.config.budget(stage, self.random_weights, labelled)
