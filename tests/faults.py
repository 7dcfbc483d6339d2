"""The tiny real build the fault tests run (FP32 EfficientNet-Lite0, 8 images, no wheel: a few seconds),
as a separate process so that real locks, signals and OS limits act on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"
TINY = """\
precision: fp32
data: {evaluation_images: 8}
bundle: {golden_images: 8, include_wheel: false}
"""


def build_args(work: Path, imagenet: Path, *extra: str) -> list[str]:
    """`build` of the tiny Lite0 CPU build into work/build (writes work/tiny.yaml)."""
    (work / "tiny.yaml").write_text(TINY)
    return ["build", "--model", MODEL, "--target", "cpu", "--imagenet", str(imagenet), "--build-dir", str(work / "build"),
            "--config", str(work / "tiny.yaml"), "--no-report", *extra]


def root_of(work: Path, target: str = "cpu") -> Path:
    return work / "build" / MODEL / target


def manifest(work: Path) -> dict:
    return json.loads((root_of(work) / "manifest.json").read_text())


def start(args: list[str], **options) -> subprocess.Popen:
    """`python -m pipeline ARGS` as its own process, from the source tree."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, text=True, **options)


def assert_consistent(root: Path) -> None:
    """Every stage folder complete, no temporary folder left, the manifest naming what is there."""
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    data = json.loads((root / "manifest.json").read_text())
    assert data["status"] == "ok"
    for name, stage in data["stages"].items():
        record = json.loads((root / name / "stage.json").read_text())
        assert record["key"] == stage["key"], name
