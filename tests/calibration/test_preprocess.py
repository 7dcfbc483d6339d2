"""Evaluation preprocessing against hand-computed geometry on real ImageNet images.

The published (timm / torchvision) evaluation transform is:
Resize(floor(crop / crop_pct), bicubic) on the shorter side, the longer side `int(size * long /
short)`; CenterCrop(crop) with offsets `int(round((size - crop) / 2.0))` (round half to even);
ToTensor (x / 255, CHW float32); Normalize(mean, std). The sizes and offsets below are worked out
by hand from each image's size; the expected pixels come from PIL called directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration.images import open_rgb
from calibration.preprocess import Preprocessing

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGENET_DIR = Path(os.environ.get("IMAGENET_DIR", REPO_ROOT.parent / "shared" / "imagenet"))

pytestmark = pytest.mark.skipif(
    not (IMAGENET_DIR / "synsets.txt").is_file(),
    reason=f"ImageNet test data not found at {IMAGENET_DIR} (set IMAGENET_DIR to the shared imagenet folder)",
)

INCEPTION_V4 = Preprocessing(crop=299, crop_pct=0.875)  # resize 341
INCEPTION_RESNET_V2 = Preprocessing(crop=299, crop_pct=0.8975)  # resize 333
EFFICIENTNET_LITE0 = Preprocessing(crop=224, crop_pct=0.875)  # resize 256

HAMMERHEAD = "train-sample/n01494475/n01494475_hammerhead.JPEG"

# (image, original size, preprocessing, resized (w, h), crop box (left, top)), all by hand:
CASES = [
    # landscape 500x375, 341: w = int(341 * 500 / 375) = int(454.67) = 454;
    # top = round(42 / 2) = 21, left = round(155 / 2) = round(77.5) = 78 (half to even)
    ("train-sample/n01440764/n01440764_tench.JPEG", (500, 375), INCEPTION_V4, (454, 341), (78, 21)),
    # 333: w = int(333 * 500 / 375) = 444; top = round(34 / 2) = 17, left = round(72.5) = 72 (even)
    ("train-sample/n01440764/n01440764_tench.JPEG", (500, 375), INCEPTION_RESNET_V2, (444, 333), (72, 17)),
    # 256: w = int(256 * 500 / 375) = int(341.33) = 341; top = 16, left = round(58.5) = 58 (even)
    ("train-sample/n01440764/n01440764_tench.JPEG", (500, 375), EFFICIENTNET_LITE0, (341, 256), (58, 16)),
    # portrait 375x500, 341: h = int(341 * 500 / 375) = 454; left = 21, top = round(77.5) = 78
    ("train-sample/n01518878/n01518878_ostrich.JPEG", (375, 500), INCEPTION_V4, (341, 454), (21, 78)),
    # portrait 333x500 at 333: already the right size, no resampling; left = 17, top = round(100.5) = 100
    (HAMMERHEAD, (333, 500), INCEPTION_RESNET_V2, (333, 500), (17, 100)),
    # tiny 75x56, upscaled: w = int(341 * 75 / 56) = int(456.70) = 456; top = 21, left = round(78.5) = 78
    ("train-sample/n01871265/n01871265_tusker.JPEG", (75, 56), INCEPTION_V4, (456, 341), (78, 21)),
    # the val images are pre-scaled to 227x227: upscaled to 341x341, offsets round(21) = 21
    ("val/ILSVRC2012_val_00000347.JPEG", (227, 227), INCEPTION_V4, (341, 341), (21, 21)),
    # ... and to 256x256 for Lite0, offsets 16
    ("val/ILSVRC2012_val_00000347.JPEG", (227, 227), EFFICIENTNET_LITE0, (256, 256), (16, 16)),
]


def expected_crop(path: Path, resized: tuple[int, int], corner: tuple[int, int], crop: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    left, top = corner
    resized_image = image.resize(resized, Image.Resampling.BICUBIC)
    return np.asarray(resized_image.crop((left, top, left + crop, top + crop)))


def test_resize_sizes_follow_timm():
    assert (INCEPTION_V4.resize, INCEPTION_RESNET_V2.resize, EFFICIENTNET_LITE0.resize) == (341, 333, 256)


@pytest.mark.parametrize("relative, size, preprocessing, resized, corner", CASES)
def test_crop_matches_hand_computed_geometry(relative, size, preprocessing, resized, corner):
    path = IMAGENET_DIR / relative
    image = open_rgb(path)
    assert image.size == size

    crop = preprocessing.crop_uint8(image)

    assert crop.shape == (preprocessing.crop, preprocessing.crop, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, expected_crop(path, resized, corner, preprocessing.crop))
    # the test can tell a one-pixel shift apart
    left, top = corner
    assert not np.array_equal(crop, expected_crop(path, resized, (left + 1, top), preprocessing.crop))
    assert not np.array_equal(crop, expected_crop(path, resized, (left, top - 1), preprocessing.crop))


def test_same_size_image_is_not_resampled():
    path = IMAGENET_DIR / HAMMERHEAD
    original = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(INCEPTION_RESNET_V2.crop_uint8(open_rgb(path)), original[100:399, 17:316])


def test_normalisation_on_specific_pixels():
    path = IMAGENET_DIR / "train-sample/n01440764/n01440764_tench.JPEG"
    crop = expected_crop(path, (454, 341), (78, 21), 299)

    x = INCEPTION_V4(Image.open(path))

    assert x.shape == (3, 299, 299) and x.dtype == np.float32 and x.flags.c_contiguous
    assert -1.0 <= x.min() and x.max() <= 1.0
    for row, column in [(0, 0), (0, 298), (150, 150), (298, 0), (298, 298), (17, 231)]:
        for channel in range(3):
            value = int(crop[row, column, channel])
            assert x[channel, row, column] == pytest.approx((value / 255 - 0.5) / 0.5, abs=1e-6)
    # channel order is RGB: a pixel's three channels come from its R, G, B
    r, g, b = (int(v) for v in crop[150, 150])
    assert x[:, 150, 150] == pytest.approx([(r / 127.5 - 1), (g / 127.5 - 1), (b / 127.5 - 1)], abs=1e-6)


def test_normalisation_with_imagenet_mean_std():
    imagenet_mean_std = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    preprocessing = Preprocessing(crop=224, crop_pct=0.875, **imagenet_mean_std)
    crop = np.array([[[0, 128, 255]]], dtype=np.uint8)
    x = preprocessing.normalize(crop)
    assert x.shape == (3, 1, 1)
    expected = [(0 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    assert x[:, 0, 0] == pytest.approx(expected, abs=1e-6)


def test_batch_layout_is_nchw():
    crops = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 255)])
    crops[1, 2, 3] = (10, 20, 30)
    x = INCEPTION_V4.normalize(crops)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert np.all(x[0] == -1.0) and x[1, 0, 0, 0] == 1.0
    assert x[1, :, 2, 3] == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], abs=1e-6)


def test_normalisation_is_bit_identical_to_torch_to_tensor_and_normalize():
    """ToTensor + Normalize as torchvision computes them (float32 divide, subtract, divide)."""
    torch = pytest.importorskip("torch")
    crop = INCEPTION_V4.crop_uint8(open_rgb(IMAGENET_DIR / "val/ILSVRC2012_val_00000347.JPEG"))
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(INCEPTION_V4.mean).view(3, 1, 1)
    std = torch.tensor(INCEPTION_V4.std).view(3, 1, 1)
    reference = tensor.sub(mean).div(std).numpy()
    assert np.array_equal(INCEPTION_V4.normalize(crop), reference)


def test_greyscale_image_gives_three_equal_channels():
    path = IMAGENET_DIR / "train-sample/n04254680/n04254680_soccer_ball.JPEG"  # one of the 23 "L" images
    assert Image.open(path).mode == "L"
    x = INCEPTION_V4(Image.open(path))
    assert x.shape == (3, 299, 299)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    back_to_uint8 = np.moveaxis((x + 1) * 127.5, 0, -1).round()
    assert np.array_equal(INCEPTION_V4.crop_uint8(open_rgb(path)), back_to_uint8)
