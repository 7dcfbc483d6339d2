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


@pytest.fixture(scope="session")
def small_cpu_build(tmp_path_factory, imagenet):
    """The session's small INT8 Lite0 build for the CPU target (tests/builds.py)."""
    from tests.builds import small_build

    return small_build(tmp_path_factory, imagenet, "cpu")


@pytest.fixture(scope="session")
def small_gpu_build(tmp_path_factory, imagenet):
    """The session's small INT8 Lite0 build for the desktop-gpu target (tests/builds.py)."""
    from tests.builds import small_build

    return small_build(tmp_path_factory, imagenet, "desktop-gpu")
