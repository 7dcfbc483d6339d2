import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imagenet_dir() -> Path:
    return Path(os.environ.get("IMAGENET_DIR", ROOT.parent / "shared" / "imagenet"))


@pytest.fixture(scope="session")
def imagenet() -> Path:
    path = imagenet_dir()
    if not (path / "val" / "val.txt").exists():
        pytest.skip(f"ImageNet test images not found at {path} (set IMAGENET_DIR)")
    return path
