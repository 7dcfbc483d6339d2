"""The preprocessing a build uses: the network's own (a registered network's published transform; for your
own model torchvision's ImageNet evaluation transform, at the ONNX file's input size), with each key of
pipeline.yaml's `preprocessing:` that is set taking its place.

Every artifact takes the project's input: RGB crops scaled to 0..1, normalised by mean / std, NCHW
(`calibration.preprocess.Preprocessing`, which the manifests record and the device side applies). What your
network takes instead is a `ModelInput`: its channel order and layout are put in front of the network by the
export stage (a channel reversal, a transpose), and mean / std given in 0..255 units or BGR order are
converted, so the device side needs to know nothing of it; the manifests record it for the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibration.preprocess import Preprocessing
from pipeline.errors import PipelineError

# torchvision's ImageNet evaluation transform (resize 256, center crop 224, bilinear): the default for your model.
OWN_DEFAULT = Preprocessing(224, 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ModelInput:
    """What the network itself takes: layout, channel order, pixel scale, and mean / std in that order and scale."""

    layout: str = "NCHW"
    channels: str = "RGB"
    scale: int = 1  # 1: pixels in 0..1 before mean / std; 255: 0..255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def as_dict(self) -> dict:
        return {"layout": self.layout, "channels": self.channels, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std),
                "note": "what the network takes; the artifacts take NCHW RGB normalised by 'preprocessing'"}


def for_source(source, config) -> tuple[Preprocessing, ModelInput]:
    """The build's preprocessing (what the artifacts take) and what the network itself takes, for a
    `pipeline.models.source.ModelSource` (not imported: that module checks a model through this one)."""
    options, input_size = config.preprocessing, config.network.input_size
    if options.crop and input_size and options.crop != input_size:
        raise PipelineError(f"preprocessing.crop {options.crop} and --input-size {input_size} disagree: give one")
    crop = options.crop or input_size
    if source.kind == "onnx":
        from pipeline.models.onnx_file import inspect

        info = inspect(source.path, options.layout)
        if info.size and crop and crop != info.size:
            raise PipelineError(f"--model {source.argument} takes {info.size}x{info.size} images: "
                                f"preprocessing.crop / --input-size {crop} does not fit it")
        base, layout, crop = OWN_DEFAULT, info.layout, crop or info.size
    elif source.own:
        base, layout = OWN_DEFAULT, options.layout or "NCHW"
    else:
        if options.channels not in ("", "RGB") or options.layout not in ("", "NCHW"):
            raise PipelineError(f"preprocessing.channels / layout describe your own network's input; "
                                f"{source.name} takes RGB NCHW")
        base, layout = source.spec.preprocessing, "NCHW"
    crop = crop or base.crop
    if options.resize and options.resize < crop:
        raise PipelineError(f"preprocessing.resize {options.resize} is smaller than the crop {crop}")
    crop_pct = crop / options.resize if options.resize else options.crop_pct or base.crop_pct
    channels, scale = options.channels or "RGB", options.scale or 1

    def as_artifacts_take(values, default):
        """mean / std as written (the network's channel order, `scale` units) -> RGB, 0..1."""
        if not values:
            return default
        ordered = values[::-1] if channels == "BGR" else values
        return tuple(float(v) / scale for v in ordered)

    mean, std = as_artifacts_take(options.mean, base.mean), as_artifacts_take(options.std, base.std)
    preprocessing = Preprocessing(crop, crop_pct, options.interpolation or base.interpolation, mean, std)

    def as_network_takes(written, values):
        """As written where given (recorded exactly), else the artifacts' in the network's order and units."""
        ordered = values[::-1] if channels == "BGR" else values
        return tuple(float(v) for v in written) or tuple(float(v) * scale for v in ordered)

    return preprocessing, ModelInput(layout, channels, scale, as_network_takes(options.mean, mean),
                                     as_network_takes(options.std, std))
