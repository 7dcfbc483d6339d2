"""Ctrl-C and SIGTERM on a real build: sent while the INT8 quantize stage runs (about 4 s of work in this
small Lite0 build), the build stops within seconds with exit 130 / 143 and one line naming the stage,
removes the stage's temporary folder, keeps every finished stage, and the same command then finishes
building only what was left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.faults import assert_consistent, build_args, manifest, root_of, start

INT8 = """\
data: {evaluation_images: 8, calibration_images: 32}
quantization: {evaluation_images: 16, sensitivity_images: 4}
bundle: {golden_images: 8, include_wheel: false}
drift:
  quantize: {max_top1_drop: 50.0}
  openvino_int8: {max_top1_drop: 50.0}
"""
FINISHED = ["reference", "export", "simplify", "openvino_fp32", "openvino_fp16", "calibrate"]


def _int8_args(work: Path, imagenet: Path) -> list[str]:
    args = build_args(work, imagenet)
    (work / "tiny.yaml").write_text(INT8)
    return args


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_stage_stops_cleanly_and_the_rerun_continues(tmp_path, imagenet, signum):
    args = _int8_args(tmp_path, imagenet)
    root = root_of(tmp_path)
    process = start(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(root.glob(".quantize.*.tmp")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert list(root.glob(".quantize.*.tmp")), "the quantize stage never started"
    sent = time.monotonic()
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 5.0
    assert process.returncode == 128 + signum  # 130, 143
    assert err.strip().splitlines()[-1] == "interrupted in quantize; run the same command to continue"
    assert "Traceback" not in err
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # temporary folder gone
    assert not (root / "quantize").exists() and not (root / "manifest.json").exists()
    for name in FINISHED:
        assert (root / name / "stage.json").is_file(), name
    assert main(args) == 0
    assert manifest(tmp_path)["built_this_run"] == ["quantize", "openvino_int8", "bundle"]
    assert_consistent(root)
