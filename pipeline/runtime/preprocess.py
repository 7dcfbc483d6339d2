"""Fast deployment preprocessing of camera frames: check, resize + center crop (OpenCV), normalise.

The reference (calibration.preprocess) resizes the shorter side with PIL's antialiased bicubic
filter and center-crops. Here OpenCV does the same geometry (same resized size, same crop offsets).
Measured against PIL's crops (mean |difference| per pixel, 40 images each): downscaling ImageNet
originals, INTER_AREA 1.2 vs INTER_CUBIC 2.9 (cubic does not antialias); upscaling the 227-pixel
val images, INTER_CUBIC 0.84 vs INTER_AREA 1.5. So: INTER_AREA down, INTER_CUBIC up.
`pipeline.runtime.evaluate.preprocessing_drift` measures what the difference costs in logits.

Normalisation is either done inside the compiled OpenVINO model (the crop goes in as uint8) or by
`Normalizer` in one vectorised numpy step (ONNX Runtime, TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

# OpenCV interpolation per manifest `interpolation` when downscaling (see the module docstring).
_DOWNSCALE = {"bicubic": "INTER_AREA", "bilinear": "INTER_AREA", "nearest": "INTER_NEAREST"}
_UPSCALE = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR", "nearest": "INTER_NEAREST"}


def check_frame(frame, what: str = "frame") -> np.ndarray:
    """The frame as an HxWx3 uint8 array, or one clear PipelineError saying what is wrong with it."""
    if frame is None:
        raise PipelineError(f"{what} is None: the camera or decoder returned no image (check the source)")
    if not isinstance(frame, np.ndarray):
        raise PipelineError(f"{what} must be a numpy array (HxWx3 uint8), got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise PipelineError(f"{what} must be uint8 (0..255), got {frame.dtype}: convert it, e.g. "
                            "np.clip(x * 255, 0, 255).astype(np.uint8)")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise PipelineError(f"{what} must be HxWx3 (3 colour channels), got shape {frame.shape}: "
                            "convert grey or BGRA frames with cv2.cvtColor first")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise PipelineError(f"{what} is empty (shape {frame.shape})")
    return frame


@dataclass(frozen=True)
class Cropper:
    """Resize the shorter side to `resize`, center-crop `crop`: the reference geometry, done by OpenCV."""

    resize: int
    crop: int
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in _DOWNSCALE:
            raise PipelineError(f"unknown interpolation {self.interpolation!r} in the bundle manifest "
                                f"(known: {', '.join(_DOWNSCALE)})")
        if not 0 < self.crop <= self.resize:
            raise PipelineError(f"bundle preprocessing: crop {self.crop} must lie in 1..resize ({self.resize})")

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, top, left) exactly as calibration.Preprocessing.crop_uint8."""
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        top = int(round((new_h - self.crop) / 2.0))
        left = int(round((new_w - self.crop) / 2.0))
        return new_h, new_w, top, left

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> crop x crop x 3 uint8 (channel order unchanged).

        The whole frame is resized, then cropped: resizing only the window under the crop is about
        twice as fast but cannot keep the reference's sampling grid, and doubled the pixel error.
        """
        cv2 = _cv2()
        height, width = frame.shape[:2]
        new_h, new_w, top, left = self.geometry(height, width)
        if (new_h, new_w) == (height, width):
            resized = frame
        else:
            table = _DOWNSCALE if new_h < height else _UPSCALE
            resized = cv2.resize(frame, (new_w, new_h), interpolation=getattr(cv2, table[self.interpolation]))
        return resized[top : top + self.crop, left : left + self.crop]


class Normalizer:
    """uint8 NxHxWx3 crops (BGR or RGB) -> float32 NCHW RGB network input in one vectorised step."""

    def __init__(self, mean, std):
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if mean.shape != (3,) or std.shape != (3,) or np.any(std == 0):
            raise PipelineError(f"bundle preprocessing: mean/std must be 3 numbers with std != 0, got {mean}, {std}")
        # (x / 255 - mean) / std == x * scale + bias
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.bias = (-mean / std).astype(np.float32)

    def __call__(self, crops: np.ndarray, rgb: bool) -> np.ndarray:
        n, h, w, _ = crops.shape
        out = np.empty((n, 3, h, w), np.float32)
        for channel in range(3):
            source = channel if rgb else 2 - channel  # BGR frames: RGB channel c is BGR channel 2 - c
            np.multiply(crops[..., source], self.scale[channel], out=out[:, channel], casting="unsafe")
            out[:, channel] += self.bias[channel]
        return out


def _cv2():
    try:
        import cv2
    except ImportError:
        raise PipelineError("OpenCV (cv2) is not installed: `pip install opencv-python-headless` "
                            "(on JetPack use the system OpenCV: a venv with --system-site-packages)") from None
    return cv2
