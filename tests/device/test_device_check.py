"""The device preflight (`python -m pipeline device-check`) and the pins it checks against."""

from __future__ import annotations

import tomllib
from pathlib import Path

from targets.tensorrt.device_info import CUDA_PYTHON_CUDA13, CUDA_PYTHON_JETPACK6

ROOT = Path(__file__).resolve().parents[2]


def test_the_tensorrt_extras_pin_what_each_jetpack_needs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt"] == [CUDA_PYTHON_JETPACK6] == ["cuda-python>=12.6,<12.7"]  # JetPack 6: CUDA 12.6
    assert extras["tensorrt-cuda13"] == [CUDA_PYTHON_CUDA13]
    for doc in ("README.md", "docs/tensorrt.md"):  # the device install line installs the extra
        text = (ROOT / doc).read_text()
        assert "py3-none-any.whl[tensorrt]'   # JetPack 6: cuda-python 12.6.x" in text, doc
        assert "cuda-python>=12.6,<13" not in text, doc
