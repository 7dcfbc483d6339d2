"""The small Lite0 bundle the device-side tests run on, built once per test module with its own config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main

MODEL = "efficientnet_lite0"


def build_bundle(tmp_path_factory, imagenet: Path, name: str, config_text: str, target: str) -> Path:
    """An INT8 Lite0 build of `target` with `config_text` as small.yaml; returns build/<model>/<target>."""
    pytest.importorskip("pipeline.stages.bundle", reason="the bundle writer (pipeline/stages/bundle/) is not in this checkout")
    folder = tmp_path_factory.mktemp(name)
    config = folder / "small.yaml"
    config.write_text(config_text)
    build_dir = folder / "build"
    assert main(["build", "--config", str(config), "--model", MODEL, "--target", target, "--imagenet", str(imagenet),
                 "--build-dir", str(build_dir), "--no-report"]) == 0
    return build_dir / MODEL / target
