"""The small INT8 EfficientNet-Lite0 builds (genuine ImageNet weights) that the stage, device and runtime tests
share: one per target and test session, all with one config, since each costs 20-30 s on two cores.

Tests that damage a bundle work on a copy; tests that rerun a build rerun it with `SmallBuild.args()`, which
leaves the folder as it was (fully cached, or only the bundle rebuilt when the project's source changed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL = "efficientnet_lite0"
# 64 calibration images, 96 INT8 evaluation images, 96 gate decision images, 40 golden images; budgets relaxed for so few images.
SMALL_CONFIG = """\
data:
  calibration_images: 64
  evaluation_images: 32
quantization:
  evaluation_images: 96
  decision_images: 96
  sensitivity_images: 4
bundle:
  golden_images: 40
tensorrt: {min_batch: 1, opt_batch: 2, max_batch: 4, workspace_mib: 512}
drift:
  quantize: {max_top1_drop: 3.0}
  openvino_int8: {max_top1_drop: 3.0}
  quantize_fp16: {max_top1_drop: 3.0}
  tensorrt_int8: {max_top1_drop: 3.0}
"""


@dataclass(frozen=True)
class SmallBuild:
    work: Path
    imagenet: Path
    target: str

    @property
    def root(self) -> Path:
        """build/<model>/<target>."""
        return self.work / "build" / MODEL / self.target

    def args(self, *extra: str) -> list[str]:
        """The `build` command line of this build (rerunning it changes nothing)."""
        return ["build", "--model", MODEL, "--target", self.target, "--imagenet", str(self.imagenet), "--build-dir",
                str(self.work / "build"), "--config", str(self.work / "small.yaml"), "--no-report", *extra]


_BUILDS: dict[str, SmallBuild] = {}


def small_build(tmp_path_factory, imagenet: Path, target: str) -> SmallBuild:
    """The session's small build of `target`, built on first use."""
    if target not in _BUILDS:
        pytest.importorskip("pipeline.stages.bundle", reason="the bundle writer (pipeline/stages/bundle/) is not here")
        from pipeline.cli import main

        build = SmallBuild(tmp_path_factory.mktemp(f"small-{target}"), imagenet, target)
        (build.work / "small.yaml").write_text(SMALL_CONFIG)
        assert main(build.args()) == 0
        assert (build.root / "bundle" / "manifest.json").is_file(), f"the {target} build wrote no bundle"
        _BUILDS[target] = build
    return _BUILDS[target]


def copy_bundle(build_root: Path, folder: Path, *leave_out: str) -> Path:
    """A private copy of a build's bundle in `folder`/bundle, for a test that damages it or writes into it;
    `leave_out`: what commands wrote into the shared bundle (engines/, results/) that the copy must not carry."""
    copy = folder / "bundle"
    shutil.copytree(build_root / "bundle", copy, ignore=shutil.ignore_patterns(*leave_out) if leave_out else None)
    return copy


def build_with_option(work: Path, imagenet: Path, target: str, option: str, int8_stages: tuple[str, ...]):
    """A small Lite0 INT8 build with one `quantization` option set (e.g. "equalization: true"), its INT8 stages'
    budgets relaxed for its 32 evaluation images: returns (root, manifest, the build's command line)."""
    import json

    from pipeline.cli import main

    relaxed = ", ".join(f"{stage}: {{max_top1_drop: 5.0}}" for stage in int8_stages)
    (work / "option.yaml").write_text(
        "data: {calibration_images: 32, evaluation_images: 16}\n"
        f"quantization: {{{option}, evaluation_images: 32, decision_images: 32, sensitivity_images: 4}}\n"
        f"drift: {{{relaxed}}}\n")
    args = ["build", "--model", MODEL, "--target", target, "--imagenet", str(imagenet),
            "--config", str(work / "option.yaml"), "--build-dir", str(work / "build"), "--no-report"]
    assert main(args) == 0
    root = work / "build" / MODEL / target
    return root, json.loads((root / "manifest.json").read_text()), args
