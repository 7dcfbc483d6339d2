"""Evaluation preprocessing, identical to the published (timm) evaluation transforms.

Resize the shorter side to `resize` with PIL bicubic (antialiased), center-crop `crop`, scale to
[0, 1], normalise with mean/std, lay out as CHW float32. timm computes `resize` as
floor(crop / crop_pct): 299 / 0.875 -> 341 for Inception-v4, 299 / 0.8975 -> 333 for
Inception-ResNet-v2, 224 / 0.875 -> 256 for EfficientNet-Lite0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    crop: int = 299
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def resize(self) -> int:
        # The epsilon keeps a crop_pct written as crop / resize (pipeline.yaml's preprocessing.resize) from
        # flooring to resize - 1 (288 / (288 / 320) = 319.99999...); timm's own ratios are far from integers.
        return math.floor(self.crop / self.crop_pct + 1e-6)

    def with_crop(self, crop: int) -> "Preprocessing":
        """The same transform for another input size (a fine-tuned network's `--input-size`)."""
        return Preprocessing(crop, self.crop_pct, self.interpolation, self.mean, self.std)

    def as_dict(self) -> dict:
        return {
            "crop": self.crop,
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def crop_uint8(self, image: Image.Image) -> np.ndarray:
        """Resize + center crop of an RGB image: HxWx3 uint8 (what golden data stores)."""
        width, height = image.size
        # torchvision Resize(int): the shorter side becomes `resize`, the longer side is truncated.
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        resized = image.resize((new_w, new_h), _INTERPOLATIONS[self.interpolation])
        # torchvision CenterCrop: offsets rounded half to even, as Python's round() does.
        top = int(round((new_h - self.crop) / 2.0))
        left = int(round((new_w - self.crop) / 2.0))
        cropped = resized.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(cropped, dtype=np.uint8)

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 (or NxHxWx3) crops -> float32 CHW (or NCHW) network input."""
        x = crops.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalize(self.crop_uint8(image.convert("RGB")))
