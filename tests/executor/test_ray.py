"""The Ray executor on a real Ray cluster on this machine (`ray start --head`, 2 CPUs, one per test module, joined
by address as a user joins theirs): a Lite0 INT8 build through Ray gives the local build's drift figures and
calibration table; a worker killed mid-evaluation is retried with the same result; files the workers cannot
decode are the build's skipped files; `build --ray-address` builds a model for two targets as Ray tasks; SIGTERM
stops such a build as it stops a local one; a model-matrix task never builds a folder another process holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    """The address of a Ray head started for this module, in a process group of its own that teardown ends.
    Token authentication (on by default since Ray 2.5x) is off: the cluster serves this machine's tests only."""
    address = f"127.0.0.1:{_free_port()}"
    log = (tmp_path_factory.mktemp("ray") / "head.log").open("w")
    # A temporary folder of its own (short: Ray's socket paths must fit 107 bytes): the head records its address
    # there, not in /tmp/ray/ray_current_cluster, where a dead head would make ray.init() on this machine hang.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--num-cpus", "2", "--port", address.split(":")[1], "--include-dashboard", "false",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
            time.sleep(0.2)
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    except BaseException:
        os.killpg(head.pid, signal.SIGKILL)
        raise
    yield address
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # raylet's agents outlive `ray start`'s own exit
    except ProcessLookupError:
        pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


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


def _shard_running() -> int | None:
    """The pid of a Ray worker running a shard (its process title is ray::predict_shard), if one is."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::predict_shard"):
            return int(pid)
    return None


def _kill_one_shard(killed: list) -> None:
    """SIGKILL the first Ray worker seen running a shard."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not killed:
        if pid := _shard_running():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.01)


def _context(small_cpu_build, shard_images: int):
    """The small build's context, configured for Ray with shards of `shard_images`."""
    from pipeline.cli import _configs, _parser
    from pipeline.context import BuildContext
    from pipeline.plan import BuildPlan
    from pipeline.progress import Reporter

    (config,), _ = _configs(_parser().parse_args(small_cpu_build.args()))
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
    local, _ = LocalExecutor(8, Reporter()).calibrate(onnx, tensors, ctx.images("calibration"), ctx.preprocessing,
                                                      2, **method)
    remote, skipped = RayExecutor(config.executor, 8, Reporter()).calibrate(onnx, tensors, ctx.images("calibration"),
                                                                             ctx.preprocessing, 1, **method)
    assert skipped == ()
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
from pipeline.cli import _configs, _parser, main
from pipeline.context import BuildContext
from pipeline.executor.work import onnxruntime_spec
from pipeline.plan import BuildPlan
from pipeline.progress import Reporter
args = {small_cpu_build.args()!r}
assert main(args) == 0
(config,), names = _configs(_parser().parse_args(args))
ctx = BuildContext(BuildPlan(config, names[0]), Reporter())
onnx = {str(small_cpu_build.root / "simplify" / "model.onnx")!r}
assert len(ctx.evaluate(onnxruntime_spec(onnx, 1), 16, "check").logits) == 16
table, _ = ctx.executor.calibrate(onnx, ["input"], ctx.images("calibration"), ctx.preprocessing, 1,
                                  method="minmax", percentile=99.99, bins=2048)
assert table.images == 64 and ctx.executor.kind == "local"
assert "ray" not in sys.modules, "the local executor imported ray"
print("no ray")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no ray" in done.stdout


def test_files_the_workers_cannot_decode_are_the_calibrate_stages_skipped_files(cluster, small_cpu_build, tmp_path):
    """A calibration image that no worker can decode is reported back, warned about and kept with the calibrate
    stage (its stage.json, then the manifest), as a local build keeps the files it could not decode."""
    from calibration.datasets import ImageRecord
    from pipeline.executor.ray_cluster import RayExecutor
    from pipeline.executor.requests import Images
    from pipeline.progress import Reporter
    from pipeline.skipped import decoded_by
    from pipeline.stages import stages_for
    from pipeline.stages.quantize.qdq import quantized_activations

    config, ctx = _context(small_cpu_build, 8)
    broken = tmp_path / "broken.JPEG"
    broken.write_text("not a JPEG at all")
    records = (*ctx.calibration_records[:15], ImageRecord(broken, 0))
    onnx = small_cpu_build.root / "simplify" / "model.onnx"
    table, skipped = RayExecutor(config.executor, 8, Reporter()).calibrate(
        onnx, quantized_activations(onnx), Images("calibration", records, None), ctx.preprocessing, 1,
        method="minmax", percentile=99.99, bins=2048)
    assert table.images == 15
    assert [(item.path, item.kind) for item in skipped] == [(broken, "unreadable")]
    ctx.record_skipped("calibration", skipped)
    calibrate = next(stage for stage in stages_for(config) if stage.name == "calibrate")
    assert decoded_by(ctx, calibrate) == [{"path": str(broken), "kind": "unreadable", "reason": skipped[0].reason,
                                           "images": "calibration"}]


TINY = """\
precision: fp32
data: {evaluation_images: 16}
bundle: {golden_images: 8, include_wheel: false}
executor: {shard_images: 8}
"""


def _cli(cluster: str, work: Path, imagenet: Path, *extra: str) -> list[str]:
    """`python -m pipeline build` of a tiny FP32 Lite0 build, joining the test's cluster by --ray-address."""
    (work / "tiny.yaml").write_text(TINY)
    return [sys.executable, "-m", "pipeline", "build", "--model", MODEL, "--ray-address", cluster, "--imagenet",
            str(imagenet), "--build-dir", str(work / "build"), "--config", str(work / "tiny.yaml"), "--no-report",
            *extra]


@pytest.mark.slow  # two FP32 builds (about a minute on two cores)
def test_build_with_a_ray_address_builds_each_target_as_a_ray_task(cluster, tmp_path, imagenet):
    """`build --target cpu --target desktop-gpu --ray-address HOST:PORT`, as a user types it: two builds as Ray
    tasks of the cluster at that address, into one build folder, each complete and checked."""
    done = subprocess.run(_cli(cluster, tmp_path, imagenet, "--target", "cpu", "--target", "desktop-gpu", "--json"),
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"building {MODEL} → cpu, desktop-gpu as Ray tasks" in done.stderr + done.stdout
    manifests = json.loads(done.stdout[done.stdout.index("{"):])
    assert list(manifests) == ["cpu", "desktop-gpu"]
    for target, by_model in manifests.items():
        manifest = by_model[MODEL]
        assert manifest["status"] == "ok" and manifest["target"] == target
        assert (tmp_path / "build" / MODEL / target / "bundle" / "manifest.json").is_file()
        assert all(stage["drift"]["passed"] for stage in manifest["stages"].values() if stage["drift"])


def test_sigterm_stops_a_build_on_ray_as_it_stops_a_local_one(cluster, tmp_path, imagenet):
    """ray.init installs a SIGTERM handler that exits 15 at once; the build keeps its own: SIGTERM while the
    reference runs on the cluster exits 143 with one line naming the stage, no temporary folder and no lock."""
    from pipeline.lock import folder_lock

    root = tmp_path / "build" / MODEL / "cpu"
    process = subprocess.Popen(_cli(cluster, tmp_path, imagenet, "--target", "cpu"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 300
    while not _shard_running() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert _shard_running() and list(root.glob(".reference.*.tmp")), "the reference never ran on the cluster"
    os.kill(process.pid, signal.SIGTERM)  # after ray.init: a shard runs
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted in reference; run the same command to continue"
    assert "Traceback" not in err
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    with folder_lock(root, wait=False):  # released
        pass
