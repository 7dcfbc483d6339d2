"""`python -m pipeline device-build` up to the TensorRT boundary, for real where it can run here.

TensorRT cannot be installed on development machines: the "no TensorRT" message runs for real; the
bundle checks, the plan's ONNX and options, the legacy calibration cache and the divergence search run
for real on a desktop-gpu bundle of an EfficientNet-Lite0 INT8 build; that device-build asks the builder
for what the bundle says is checked against the labelled TensorRT TEST DOUBLE (tests/targets/tensorrt_double.py);
the engine itself is built and checked only where TensorRT and a GPU exist.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifact import Bundle
from pipeline.cli import main
from pipeline.errors import PipelineError
from tests.builds import copy_bundle

ROOT = Path(__file__).resolve().parents[2]
NO_TENSORRT_REASON = "TensorRT is not importable here (no NVIDIA TensorRT on development machines)"
# What a device reports about itself; with the test double there is no GPU to ask.
TEST_GPU = {"name": "NVIDIA Orin (test double)", "compute_capability": "8.7", "l4t_release": "36.4.3"}


def _tensorrt_here() -> tuple[bool, str]:
    from targets.tensorrt.device_info import tensorrt_status

    return tensorrt_status()


@pytest.fixture(scope="module")
def gpu_build(small_gpu_build) -> Path:
    return small_gpu_build.root


@pytest.fixture()
def bundle(gpu_build, tmp_path) -> Bundle:
    """A private copy of the GPU bundle (device-build writes engines/ into it)."""
    return Bundle.open(copy_bundle(gpu_build, tmp_path, "engines", "results"))


# ---------------------------------------------------------------------------------------------------
# No TensorRT here: the clear message, for real.


def test_no_tensorrt_gives_one_clear_line_and_exit_2(bundle, capsys):
    ok, reason = _tensorrt_here()
    if ok:
        pytest.skip("TensorRT and a GPU are here: the no-TensorRT message does not apply")
    assert main(["device-build", str(bundle.root)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build a TensorRT engine here: ")
    assert reason.rstrip(".") in lines[0]
    assert "--system-site-packages" in lines[0] and "cuda-python>=12.6,<12.7" in lines[0]
    assert lines[0].count("--system-site-packages") == 1  # the advice does not repeat the reason
    assert "Traceback" not in captured.err
    assert "FAIL tensorrt" in captured.out  # device-check ran first, on stdout


def test_a_folder_that_is_no_bundle_is_said_before_anything_about_tensorrt(tmp_path, capsys):
    assert main(["device-build", str(tmp_path)]) == 2
    assert "not a bundle (manifest.json missing)" in capsys.readouterr().err


def test_no_tensorrt_without_torch(bundle):
    if _tensorrt_here()[0]:
        pytest.skip("TensorRT and a GPU are here")
    blocker = "import sys\nfor name in ('torch', 'onnx', 'onnxsim'): sys.modules[name] = None\n"
    code = blocker + f"from pipeline.cli import main\nsys.exit(main(['device-build', {str(bundle.root)!r}]))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cannot build a TensorRT engine here" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# TensorRT-independent pieces.


def test_engine_folder_names_keep_engines_apart():
    from pipeline.device_build import engine_folder_name

    assert engine_folder_name("int8", "default", -1, "NVIDIA Orin", "10.3.0") == "int8-nvidia-orin-trt10.3.0"
    assert engine_folder_name("int8", "fallback", 0, "NVIDIA Orin", "10.3.0") == "int8-fallback-dla0-b1-nvidia-orin-trt10.3.0"
    # DLA engines have static shapes: one engine per batch size, named by it
    assert engine_folder_name("int8", "default", 1, "NVIDIA Orin", "10.3.0", dla_batch=4) == \
        "int8-dla1-b4-nvidia-orin-trt10.3.0"
    assert engine_folder_name("int8", "default", -1, "NVIDIA Orin", "10.3.0", dla_batch=4) == "int8-nvidia-orin-trt10.3.0"
    assert engine_folder_name("fp16", "default", -1, "NVIDIA GeForce RTX 4090", "11.4.1") == \
        "fp16-nvidia-geforce-rtx-4090-trt11.4.1"


def test_engine_reuse_needs_matching_metadata():
    from pipeline.device_build import reusable

    metadata = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "source_onnx_sha256": "ab", "extra": {"mark_outputs": []}}
    assert reusable(metadata, "10.3.0", "Orin", "ab") == (True, "metadata matches")
    assert reusable(None, "10.3.0", "Orin", "ab")[0] is False
    for changed in (("10.16.0", "Orin", "ab"), ("10.3.0", "RTX 4090", "ab"), ("10.3.0", "Orin", "cd")):
        ok, why = reusable(metadata, *changed)
        assert not ok and "differs" in why
    assert reusable(metadata, "10.3.0", "Orin", "ab", mark_outputs=("a",))[0] is False


def test_first_divergence_walks_the_manifest_order():
    from pipeline.device_build import first_divergence

    rng = np.random.default_rng(0)
    host = {name: rng.standard_normal((2, 8, 4, 4)).astype(np.float32) for name in ("a", "b", "c", "d")}
    assert first_divergence(host, dict(host), ["a", "b", "c", "d"])[0] is None
    device = dict(host, c=-host["c"], d=np.full_like(host["d"], np.nan))
    first, cosines = first_divergence(host, device, ["a", "b", "c", "d"])
    assert first == "c" and cosines["a"] == cosines["b"] == 1.0 and cosines["c"] == pytest.approx(-1.0)
    assert np.isnan(cosines["d"])
    # the order is the manifest's, not alphabetical; a tensor the engine did not produce counts as diverged
    assert first_divergence(host, {k: v for k, v in host.items() if k != "d"}, ["d", "a"]) == ("d", {"d": None, "a": 1.0})
    with pytest.raises(PipelineError, match="no tensor 'e'"):
        first_divergence(host, host, ["e"])


# ---------------------------------------------------------------------------------------------------
# On a real desktop-gpu bundle.


def test_cpu_bundle_is_refused(bundle):
    from pipeline.device_build import check_gpu_bundle

    check_gpu_bundle(bundle)
    with pytest.raises(PipelineError, match="verify"):
        check_gpu_bundle(Bundle(bundle.root, {**bundle.manifest, "target": "cpu"}))


def test_plan_models_are_the_bundle_files(bundle):
    from pipeline.device_build import plan_models

    models = plan_models(bundle, "int8")
    assert {key: path.name for key, path in models.items()} == {
        "fp32": "fp32.onnx", "fp16": "fp16.onnx", "int8_qdq": "int8_qdq.onnx", "int8_qdq_fp16": "int8_qdq_fp16.onnx"}
    assert all(path.is_file() and path.parent == bundle.root / "models" for path in models.values())
    fallback = plan_models(bundle, "int8", "fallback")
    assert fallback["int8_qdq"].name == fallback["int8_qdq_fp16"].name == "int8_qdq_fallback.onnx"
    with pytest.raises(PipelineError, match="int8 engines only"):
        plan_models(bundle, "fp16", "fallback")
    (bundle.root / "models" / "fp16.onnx").unlink()
    with pytest.raises(PipelineError, match="fp16.onnx: missing"):
        plan_models(bundle, "fp16")


def test_engine_options_follow_the_bundle(bundle):
    from pipeline.device_build import engine_options

    options = engine_options(bundle, "int8")
    assert (options.min_batch, options.opt_batch, options.max_batch, options.workspace_mib) == (1, 2, 4, 512)
    assert options.image_size == 224 and options.input_name == "input" and options.dla_core == -1
    assert options.timing_cache == bundle.root / "engines" / "tensorrt-timing.cache"
    assert engine_options(bundle, "int8", dla_core=1).dla_core == 1  # --dla-core overrides


def test_legacy_calibration_cache_from_the_bundle_table(bundle):
    from pipeline.device_build import write_calibration_cache
    from targets.tensorrt.calibration_cache import read_legacy_cache

    table = json.loads((bundle.root / "calibration.json").read_text())["tensors"]
    for version, header in (("10.3.0", "TRT-100300-EntropyCalibration2"), ("10.16.0", "TRT-101600-EntropyCalibration2")):
        path = write_calibration_cache(bundle, version)
        assert path == bundle.root / "engines" / "calibration.cache"
        found_header, scales = read_legacy_cache(path)
        assert found_header == header and set(scales) == set(table)
        for name, entry in table.items():
            as_float32 = struct.unpack(">f", struct.pack(">f", entry["amax"] / 127))[0]
            assert scales[name] == as_float32
    assert [p.name for p in (bundle.root / "engines").iterdir()] == ["calibration.cache"]  # no temp file left
    (bundle.root / "calibration.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PipelineError, match="calibration.json"):
        write_calibration_cache(bundle, "10.3.0")


def test_divergence_search_on_the_bundle_intermediates(bundle):
    from pipeline.device_build import failure_advice, first_divergence, intermediates

    order, host = intermediates(bundle)
    assert order == bundle.manifest["golden"]["intermediate_tensors"] and len(order) >= 3
    assert set(order) == set(host)
    first, cosines = first_divergence(host, host, order)
    assert first is None and all(c == 1.0 for c in cosines.values())
    # The device drifts from the third tensor on: noise of the tensor's own size (cosine about 0.7).
    rng = np.random.default_rng(0)
    device = dict(host)
    for name in order[2:]:
        value = host[name].astype(np.float32)
        device[name] = value + rng.standard_normal(value.shape).astype(np.float32) * value.std()
    first, cosines = first_divergence(host, device, order)
    assert first == order[2]
    assert cosines[order[0]] == cosines[order[1]] == 1.0 and cosines[order[2]] < 0.9
    advice = failure_advice(bundle, "int8", "default", {"first": first, "cosines": cosines})
    assert order[2] in advice and "--variant fallback" in advice and "--precision fp16" in advice


# ---------------------------------------------------------------------------------------------------
# What device-build asks the builder for, against the TensorRT TEST DOUBLE.


@pytest.fixture()
def double():
    try:
        from tests.targets import tensorrt_double
    except ImportError:
        pytest.skip("the TensorRT test double (tests/targets/tensorrt_double.py) is not in this checkout")
    return tensorrt_double


def test_int8_on_tensorrt_10_asks_for_the_bundle_options(bundle, double):
    from pipeline.device_build import engine_folder_name, ensure_engine, plan_for

    trt = double.make_tensorrt("10.3", "10.3.0")
    plan, options, features = plan_for(bundle, "int8", "default", None, trt)
    assert plan.onnx == bundle.root / "models" / "int8_qdq.onnx" and plan.calibration_cache is None
    folder = bundle.root / "engines" / engine_folder_name("int8", "default", -1, TEST_GPU["name"], features.version)
    engine = ensure_engine(plan, options, folder, TEST_GPU, trt)
    (record,) = trt.builds
    assert record == double.engine_record(engine)
    assert record["profiles"] == [{"input": {"min": [1, 3, 224, 224], "opt": [2, 3, 224, 224], "max": [4, 3, 224, 224]}}]
    assert record["workspace"] == 512 << 20
    assert set(record["builder_flags"]) == {"FP16", "INT8"} and record["device"] == "GPU"
    assert record["calibration_cache"] is None and record["outputs"] == ["logits"]
    assert (bundle.root / "engines" / "tensorrt-timing.cache").is_file()
    metadata = json.loads((folder / "model.engine.json").read_text())
    assert metadata["tensorrt_version"] == "10.3.0" and metadata["gpu_name"] == TEST_GPU["name"]
    assert metadata["source_onnx"] == "int8_qdq.onnx"
    # Same TensorRT, GPU and ONNX: reused; another TensorRT: rebuilt.
    assert ensure_engine(plan, options, folder, TEST_GPU, trt) == engine and len(trt.builds) == 1
    newer = double.make_tensorrt("10.3", "10.16.0")
    ensure_engine(plan, options, folder, TEST_GPU, newer)
    assert len(newer.builds) == 1


def test_dla_on_tensorrt_10_takes_the_legacy_cache(bundle, double):
    from pipeline.device_build import ensure_engine, plan_for

    trt = double.make_tensorrt("10.3", "10.3.0")
    plan, options, _ = plan_for(bundle, "int8", "default", 0, trt)
    assert plan.onnx.name == "fp32.onnx" and plan.calibration_cache == bundle.root / "engines" / "calibration.cache"
    ensure_engine(plan, options, bundle.root / "engines" / "dla", TEST_GPU, trt)
    (record,) = trt.builds
    assert record["device"] == "DLA" and record["dla_core"] == 0
    assert {"INT8", "FP16", "GPU_FALLBACK"} <= set(record["builder_flags"])
    assert record["calibration_cache"].splitlines()[0] == "TRT-100300-EntropyCalibration2"
    # The fallback variant is a Q/DQ model: DLA's implicit INT8 cannot take it, and says so.
    with pytest.raises(PipelineError, match="--dla-core -1"):
        plan_for(bundle, "int8", "fallback", 0, trt)


def test_strongly_typed_tensorrt_and_the_fallback_variant(bundle, double):
    from pipeline.device_build import ensure_engine, plan_for

    trt = double.make_tensorrt("11.1", "11.4.1")
    plan, options, _ = plan_for(bundle, "int8", "default", None, trt)
    assert plan.onnx.name == "int8_qdq_fp16.onnx" and plan.strongly_typed
    ensure_engine(plan, options, bundle.root / "engines" / "st", TEST_GPU, trt)
    assert not {"FP16", "INT8"} & set(trt.builds[0]["builder_flags"])
    plan, _, _ = plan_for(bundle, "int8", "fallback", None, trt)
    assert plan.onnx.name == "int8_qdq_fallback.onnx"
    plan, _, _ = plan_for(bundle, "fp16", "default", None, double.make_tensorrt("10.3", "10.3.0"))
    assert plan.onnx.name == "fp32.onnx" and "FP16" in plan.flags


def test_device_build_on_dla_end_to_end_against_the_doubles(bundle, double, monkeypatch):
    """The whole device-build flow on DLA core 0, batch 3 (static): plan, cache, build, placement,
    golden run with a padded last batch (40 images), latency and throughput at the one batch size.
    TensorRT and CUDA are the labelled test doubles: the drift verdict means nothing and is not checked."""
    import sys

    import pipeline.device_build as device_build
    import targets.tensorrt.device_info as device_info
    import targets.tensorrt.runner as runner_module
    from tests.targets.cuda_double import make_cudart

    cudart, trt = make_cudart(), double.make_tensorrt("10.3", "10.3.0")
    gpu = {**TEST_GPU, "memory_mib": 8192, "devices": 1, "driver": "12.6", "runtime": "12.6", "cuda_python": None}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(device_build, "require_tensorrt", lambda: None)
    for module in (device_info, runner_module):
        monkeypatch.setattr(module, "cudart", lambda: cudart)
        monkeypatch.setattr(module, "gpu_description", lambda device=0: gpu)
    results = device_build.build_and_check(bundle.root, "int8", dla_core=0, dla_batch=3, seconds=0.05,
                                           trtexec=False, diagnose=False)
    (record,) = trt.builds
    assert record["device"] == "DLA" and record["profiles"] == [{"input": {k: [3, 3, 224, 224] for k in ("min", "opt", "max")}}]
    engine = results["engine"]
    assert Path(engine["path"]).parent.name == "int8-dla0-b3-nvidia-orin-test-double-trt10.3.0"
    assert engine["static_shapes"] and engine["batches"] == [3, 3, 3]
    assert engine["placement"]["on_dla"] > 0 and " layers on DLA 0, " in engine["placement_summary"]
    assert results["drift"]["images"] == 40  # 14 calls of 3, the last padded, the padding dropped
    assert results["latency"]["batch"] == 3 and results["throughput"]["batch"] == 3
    assert "placement" in results["table"] and "fell back to GPU" in results["table"]
    assert not cudart.buffers  # the runner freed every allocation
    # The engine is reused now; a DLA budget it misses still stops device-build.
    path = bundle.root / "manifest.json"
    text = path.read_text()
    manifest = json.loads(text)
    manifest["tensorrt"]["min_dla_layers"] = 1.0
    path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(PipelineError, match="tensorrt.min_dla_layers asks 100%"):
            device_build.build_and_check(bundle.root, "int8", dla_core=0, dla_batch=3, seconds=0.05, trtexec=False,
                                         diagnose=False)
    finally:
        path.write_text(text)  # the module's other tests share the bundle
    assert len(trt.builds) == 1  # reused, not rebuilt


# ---------------------------------------------------------------------------------------------------
# The real thing, where TensorRT and a GPU exist.


def test_device_build_on_a_real_gpu(bundle, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip(NO_TENSORRT_REASON)
    ok, reason = _tensorrt_here()
    if not ok:
        pytest.skip(f"TensorRT imports but cannot build here: {reason}")
    assert main(["device-build", str(bundle.root), "--precision", "fp16", "--seconds", "1", "--no-trtexec"]) == 0
    (written,) = (bundle.root / "results").glob("device-build-fp16-*.json")
    results = json.loads(written.read_text())
    assert results["passed"] and results["drift"]["images"] == bundle.manifest["golden"]["images"]
    assert results["latency"]["median_ms"] > 0 and results["throughput"]["batch"] == 4
    assert "within budget" in capsys.readouterr().out
