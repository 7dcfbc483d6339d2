"""The Ray executor on a real local Ray cluster (2 CPUs, one per test module): a Lite0 INT8 build through Ray
gives the local build's drift figures and calibration table; a worker killed mid-evaluation is retried with the
same result; a model-matrix task never builds a folder another process holds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")

from tests.builds import MODEL, SMALL_CONFIG  # noqa: E402

# Exact figures: counts and top-1 agree to the image; float figures to torch's determinism (a worker runs the
# reference on 1 thread, the local run on every core: its logits differ by about 5e-6).
EXACT = ("images", "labelled_images", "ref_top1", "ref_top5", "top1", "top5", "flips_lost", "flips_gained",
         "agreement", "passed", "failures")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_build(cluster, small_cpu_build, tmp_path_factory):
    """The session's small CPU build (tests/builds.py) again, into a new folder, with `executor.kind: ray`."""
    from pipeline.cli import main

    work = tmp_path_factory.mktemp("ray-build")
    (work / "small.yaml").write_text(SMALL_CONFIG + "executor: {kind: ray, shard_images: 16}\n")
    args = small_cpu_build.args()
    args[args.index("--build-dir") + 1] = str(work / "build")
    args[args.index("--config") + 1] = str(work / "small.yaml")
    assert main(args) == 0
    return work / "build" / MODEL / "cpu"


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.mark.slow  # a second INT8 build (2-3 min on two cores); the fast tier checks predict and calibrate below
def test_a_build_through_ray_gives_the_local_figures_and_table(ray_build, small_cpu_build):
    local, remote = _manifest(small_cpu_build.root), _manifest(ray_build)
    assert remote["stages"].keys() == local["stages"].keys()
    checked = 0
    for name, stage in local["stages"].items():
        if stage["drift"] is None:
            continue
        ours, theirs = stage["drift"], remote["stages"][name]["drift"]
        assert {k: ours[k] for k in EXACT} == {k: theirs[k] for k in EXACT}, name
        assert theirs["cosine"] == pytest.approx(ours["cosine"], abs=1e-6), name
        checked += 1
    assert checked >= 5  # export, simplify, openvino_fp32/fp16, quantize, openvino_int8
    # Same reference logits, same images, in the same order.
    assert (ray_build / "reference" / "images.txt").read_text() == (small_cpu_build.root / "reference" / "images.txt").read_text()
    np.testing.assert_array_equal(np.load(ray_build / "reference" / "labels.npy"),
                                  np.load(small_cpu_build.root / "reference" / "labels.npy"))
    np.testing.assert_allclose(np.load(ray_build / "reference" / "logits.npy"),
                               np.load(small_cpu_build.root / "reference" / "logits.npy"), rtol=0, atol=1e-4)
    # ONNX Runtime and OpenVINO give the same logits bit for bit on a worker's one thread.
    for check in ("check_export", "check_openvino_fp32", "check_openvino_fp16", "quantize", "check_openvino_int8"):
        np.testing.assert_array_equal(np.load(ray_build / check / "logits.npy"),
                                      np.load(small_cpu_build.root / check / "logits.npy"), err_msg=check)
    # The calibration table, merged from per-shard statistics (4 shards of 16), equal to the local one;
    # and what the gate chose from it.
    table = json.loads((ray_build / "calibrate" / "calibration.json").read_text())
    assert table == json.loads((small_cpu_build.root / "calibrate" / "calibration.json").read_text())
    assert table["images"] == 64
    assert remote["stages"]["quantize"]["facts"]["excluded_layers"] == local["stages"]["quantize"]["facts"]["excluded_layers"]


def _kill_one_shard(killed: list) -> None:
    """SIGKILL the first Ray worker seen running a shard (its process title is ray::predict_shard)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::predict_shard"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.01)


def _context(small_cpu_build, shard_images: int):
    """The small build's context, configured for Ray with shards of `shard_images`."""
    from pipeline.cli import _config, _parser
    from pipeline.context import BuildContext
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter

    config, _ = _config(_parser().parse_args(small_cpu_build.args()))
    config = replace(config, executor=replace(config.executor, kind="ray", shard_images=shard_images))
    return config, BuildContext(BuildPlan(config, MODEL), Reporter())


def test_calibration_on_ray_merges_shards_into_the_local_table(cluster, small_cpu_build):
    from pipeline.executor.local import LocalExecutor
    from pipeline.executor.ray_cluster import RayExecutor
    from pipeline.progress import Reporter
    from pipeline.stages.quantize.qdq import quantized_activations

    config, ctx = _context(small_cpu_build, 16)
    onnx = small_cpu_build.root / "simplify" / "model.onnx"
    tensors = quantized_activations(onnx)
    method = {"method": "percentile", "percentile": 99.99, "bins": 2048}
    local = LocalExecutor(8, Reporter()).calibrate(onnx, tensors, ctx.images("calibration"), ctx.preprocessing, 2,
                                                   **method)
    remote = RayExecutor(config.executor, 8, Reporter()).calibrate(onnx, tensors, ctx.images("calibration"),
                                                                    ctx.preprocessing, 1, **method)
    assert remote.images == local.images == 64  # 4 shards of 16
    assert remote.as_dict() == local.as_dict()
    assert remote.as_dict()["tensors"] == json.loads((small_cpu_build.root / "calibrate" / "calibration.json")
                                                     .read_text())["tensors"]


def test_a_killed_worker_is_retried_and_the_logits_are_unchanged(cluster, small_cpu_build):
    from pipeline.executor.local import LocalExecutor
    from pipeline.executor.ray_cluster import RayExecutor
    from pipeline.executor.work import onnxruntime_spec
    from pipeline.progress import Reporter

    config, ctx = _context(small_cpu_build, 8)
    spec = onnxruntime_spec(small_cpu_build.root / "simplify" / "model.onnx", threads=1)
    local = LocalExecutor(8, Reporter()).predict(spec, ctx.images("evaluation"), 96, "local", ctx.preprocessing)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_one_shard, args=(killed,))
    killer.start()
    remote = RayExecutor(config.executor, 8, Reporter()).predict(spec, ctx.images("evaluation"), 96, "on Ray",
                                                                 ctx.preprocessing)
    killer.join()
    assert killed, "no shard was running to kill"
    assert remote.paths == local.paths
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.logits, local.logits)


def test_a_matrix_task_never_builds_a_folder_another_process_holds(cluster, tmp_path, imagenet):
    from pipeline.config import load_config
    from pipeline.errors import BusyError
    from pipeline.executor.matrix import build_matrix
    from pipeline.layout import build_root
    from pipeline.lock import folder_lock

    config = load_config(None, {"build_dir": str(tmp_path / "build"), "data": {"imagenet": str(imagenet)},
                                "executor": {"kind": "ray"}})
    root = build_root(config.build_dir, MODEL, "cpu")
    with folder_lock(root, wait=False):
        with pytest.raises(BusyError, match=f"{MODEL} → cpu: .*in use by pid {os.getpid()}"):
            build_matrix(config, [(MODEL, "cpu")], wait=False)
    assert not (root / "reference").exists()


def test_the_local_executor_never_imports_ray(small_cpu_build):
    """The default executor evaluates and calibrates without importing Ray: checked in a fresh process, through
    a cached rerun of the build and then a drift-check evaluation and a calibration of its simplified ONNX."""
    import subprocess
    import sys

    script = f"""
import sys
from pipeline.cli import _config, _parser, main
from pipeline.context import BuildContext
from pipeline.executor.work import onnxruntime_spec
from pipeline.plan import BuildPlan
from pipeline.progress import Reporter
args = {small_cpu_build.args()!r}
assert main(args) == 0
config, names = _config(_parser().parse_args(args))
ctx = BuildContext(BuildPlan(config, names[0]), Reporter())
onnx = {str(small_cpu_build.root / "simplify" / "model.onnx")!r}
assert len(ctx.evaluate(onnxruntime_spec(onnx, 1), 16, "check").logits) == 16
table = ctx.executor.calibrate(onnx, ["input"], ctx.images("calibration"), ctx.preprocessing, 1, method="minmax",
                               percentile=99.99, bins=2048)
assert table.images == 64 and ctx.executor.kind == "local"
assert "ray" not in sys.modules, "the local executor imported ray"
print("no ray")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no ray" in done.stdout


@pytest.mark.slow
def test_a_matrix_builds_two_targets_as_ray_tasks(cluster, tmp_path, imagenet):
    """Two FP32 Lite0 builds (cpu, desktop-gpu) as Ray tasks into one build folder, each complete and checked."""
    from pipeline.config import load_config
    from pipeline.executor.matrix import build_matrix
    from pipeline.layout import build_root

    config = load_config(None, {"build_dir": str(tmp_path / "build"), "data": {"imagenet": str(imagenet),
                                "evaluation_images": 16}, "precision": "fp32", "bundle": {"golden_images": 8},
                                "executor": {"kind": "ray"}})
    jobs = [(MODEL, "cpu"), (MODEL, "desktop-gpu")]
    manifests = build_matrix(config, jobs)
    assert list(manifests) == jobs
    for (model, target), manifest in manifests.items():
        assert manifest["status"] == "ok" and manifest["target"] == target
        assert (build_root(config.build_dir, model, target) / "bundle" / "manifest.json").is_file()
        assert all(stage["drift"]["passed"] for stage in manifest["stages"].values() if stage["drift"])
