"""targets/tensorrt: plans, builder requests (against the labelled test double of `tensorrt`),
the legacy calibration cache from a real table, engine metadata, trtexec lines and parsing, device
facts on this machine, and the real engine + runner wherever TensorRT and a GPU exist."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from targets.tensorrt import builder, calibration_cache, device_info, metadata, trtexec
from targets.tensorrt.builder import BuildPlan, EngineOptions, Features, build_engine, detect_features, plan_build
from targets.tensorrt.metadata import EngineMetadata, check_compatible, metadata_path
from tests.targets.tensorrt_double import engine_record, make_tensorrt

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "targets" / "tensorrt"
TRT10 = dict(api="10.3", version="10.3.0")  # the double offers exactly the names of these API lists
TRT11 = dict(api="11.1", version="11.1.0")
DEVICE = {"name": "Orin", "compute_capability": "8.7", "l4t_release": "36.4.3"}  # what cuda-python would say
ALL_MODELS = ("fp32", "fp16", "int8_qdq", "int8_qdq_fp16")


def tiny_onnx(path: Path, size: int = 32) -> Path:
    """conv-relu-conv-relu-pool-gemm with input `input` (dynamic batch) and output `logits`."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.3, (8, 8, 3, 3)), "b2": rng.normal(0, 0.1, 8),
        "w3": rng.normal(0, 0.3, (10, 8)), "b3": rng.normal(0, 0.1, 10),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "w3", "b3"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The four bundle model keys; the tiny FP32 ONNX stands in for each (the double reads names only)."""
    folder = tmp_path_factory.mktemp("models")
    source = tiny_onnx(folder / "fp32.onnx")
    found = {"fp32": source}
    for key in ALL_MODELS[1:]:
        found[key] = folder / f"{key}.onnx"
        found[key].write_bytes(source.read_bytes())
    return found


def options(**changes) -> EngineOptions:
    values = dict(precision="int8", image_size=32, min_batch=1, opt_batch=4, max_batch=8, workspace_mib=512)
    values.update(changes)
    return EngineOptions(**values)


# ----------------------------------------------------------------------------- features and plans


def test_features_are_read_from_the_module_not_its_version():
    ten, eleven = detect_features(make_tensorrt(**TRT10)), detect_features(make_tensorrt(**TRT11))
    assert (ten.strongly_typed_only, ten.has_int8_flag, ten.has_fp16_flag, ten.has_calibrator) == (False, True, True, True)
    assert ten.version == "10.3.0"
    assert (eleven.strongly_typed_only, eleven.has_int8_flag, eleven.has_calibrator) == (True, False, False)
    # A 10.x version string on a module without precision flags is still planned as strongly typed.
    odd = detect_features(make_tensorrt("10.3", "10.16.0", hide=("BuilderFlag.FP16", "BuilderFlag.INT8")))
    assert odd.strongly_typed_only


@pytest.mark.parametrize("double, request_, expected", [
    (TRT10, dict(precision="int8"), ("int8_qdq", False, ("FP16", "INT8"), False)),
    (TRT11, dict(precision="int8"), ("int8_qdq_fp16", True, (), False)),
    (TRT10, dict(precision="int8", dla_core=0), ("fp32", False, ("INT8", "FP16", "GPU_FALLBACK"), True)),
    (TRT11, dict(precision="int8", dla_core=1), ("int8_qdq_fp16", True, ("GPU_FALLBACK",), False)),
    (TRT10, dict(precision="fp16"), ("fp32", False, ("FP16",), False)),
    (TRT11, dict(precision="fp16"), ("fp16", True, (), False)),
    (TRT10, dict(precision="fp16", dla_core=0), ("fp32", False, ("FP16", "GPU_FALLBACK"), False)),
    (TRT10, dict(precision="fp32"), ("fp32", False, (), False)),
    (TRT11, dict(precision="fp32"), ("fp32", True, (), False)),
])
def test_plan_follows_the_support_matrix(models, tmp_path, double, request_, expected):
    features = detect_features(make_tensorrt(**double))
    cache = tmp_path / "calibration.cache"
    plan = plan_build(features, options(**request_), models, calibration_cache=cache)
    key, strongly_typed, flags, uses_cache = expected
    assert plan.onnx == models[key]
    assert plan.strongly_typed is strongly_typed and plan.flags == flags
    assert (plan.calibration_cache == cache) if uses_cache else plan.calibration_cache is None
    assert plan.note
    assert builder.needs_calibration_cache(features, options(**request_)) is uses_cache


def test_strongly_typed_dla_plan_says_so(models):
    plan = plan_build(detect_features(make_tensorrt(**TRT11)), options(dla_core=0), models)
    assert "release notes" in plan.note and "DLA" in plan.note


@pytest.mark.parametrize("double, request_, missing, words", [
    (TRT10, dict(precision="int8"), "int8_qdq", "int8_qdq model"),
    (TRT11, dict(precision="int8"), "int8_qdq_fp16", "int8_qdq_fp16 model"),
    (TRT11, dict(precision="fp16"), "fp16", "fp16 model"),
    (TRT10, dict(precision="fp32"), "fp32", "fp32 model"),
])
def test_a_missing_model_is_named(models, double, request_, missing, words):
    partial = {k: v for k, v in models.items() if k != missing}
    with pytest.raises(PipelineError, match=words):
        plan_build(detect_features(make_tensorrt(**double)), options(**request_), partial)


def test_impossible_requests_are_refused(models):
    ten = detect_features(make_tensorrt(**TRT10))
    with pytest.raises(PipelineError, match="DLA runs FP16 and INT8 only"):
        plan_build(ten, options(precision="fp32", dla_core=0), models)
    with pytest.raises(PipelineError, match="legacy calibration cache"):
        plan_build(ten, options(dla_core=0), models)  # no cache given
    with pytest.raises(PipelineError, match="precision must be one of"):
        plan_build(ten, options(precision="int4"), models)
    with pytest.raises(PipelineError, match="min_batch <= opt_batch <= max_batch"):
        plan_build(ten, options(min_batch=4, opt_batch=2), models)
    # DLA INT8 on a TensorRT with neither calibrators nor strongly typed-only builds nor the INT8 flag.
    neither = Features("10.99.0", False, has_int8_flag=False, has_fp16_flag=True, has_calibrator=False)
    with pytest.raises(PipelineError, match="needs a calibrator or the INT8 flag"):
        plan_build(neither, options(dla_core=0), models)


def test_model_files_from_a_manifest():
    manifest = {"artifacts": {
        "fp32": {"file": "models/fp32.onnx", "kind": "onnx"},
        "fp16": {"file": "models/fp16.onnx", "kind": "onnx"},
        "int8": {"file": "models/int8_qdq.onnx", "kind": "onnx", "strongly_typed": "models/int8_qdq_fp16.onnx",
                 "fallback": {"file": "models/int8_qdq_fallback.onnx"}, "calibration": "calibration.json"},
    }}
    assert builder.model_files(manifest) == {
        "fp32": "models/fp32.onnx", "fp16": "models/fp16.onnx", "int8_qdq": "models/int8_qdq.onnx",
        "int8_qdq_fp16": "models/int8_qdq_fp16.onnx", "int8_qdq_fallback": "models/int8_qdq_fallback.onnx"}
    cpu = {"artifacts": {"int8": {"file": "models/model.xml", "kind": "openvino"}}}
    assert builder.model_files(cpu) == {}


# ----------------------------------------------------------------------------- builder requests (test double)


def build_with(double: dict, models, tmp_path, request_: dict | None = None, cache: Path | None = None, **kwargs):
    trt = make_tensorrt(**double)
    opts = options(timing_cache=tmp_path / "timing.cache", **(request_ or {}))
    plan = plan_build(detect_features(trt), opts, models, calibration_cache=cache)
    engine = tmp_path / "engines" / "int8" / "model.engine"
    meta = build_engine(plan, opts, engine, metadata_extra={"bundle": "test"}, trt=trt, device=DEVICE, **kwargs)
    return trt, plan, engine, meta


def test_trt10_int8_asks_for_qdq_fp16_int8_profile_workspace_and_timing_cache(models, tmp_path):
    (tmp_path / "timing.cache").write_bytes(b"earlier;")
    trt, plan, engine, meta = build_with(TRT10, models, tmp_path)
    asked = trt.builds[-1]
    assert asked["network_flags"] == [] and asked["builder_flags"] == ["FP16", "INT8"]
    assert asked["workspace"] == 512 * 2**20
    assert asked["profiles"] == [{"input": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}}]
    assert asked["device"] == "GPU" and asked["calibration_cache"] is None
    assert asked["timing_cache_loaded"] == "earlier;" and asked["timing_cache_ignore_mismatch"] is False
    assert (tmp_path / "timing.cache").read_bytes() == b"earlier;timings;"  # saved after the build
    # engine and metadata side by side; the engine file is exactly what TensorRT serialized
    assert engine.is_file() and metadata_path(engine) == engine.with_name("model.engine.json")
    assert engine_record(engine) == asked
    loaded = EngineMetadata.load(metadata_path(engine))
    assert loaded == meta
    assert (meta.precision, meta.strongly_typed, meta.tensorrt_version) == ("int8", False, "10.3.0")
    assert (meta.gpu_name, meta.compute_capability, meta.l4t_release) == ("Orin", "8.7", "36.4.3")
    assert meta.source_onnx == "int8_qdq.onnx" and meta.dla_core == -1
    from pipeline.artifact import sha256_file

    assert meta.source_onnx_sha256 == sha256_file(models["int8_qdq"])
    assert meta.input_shapes["max"] == [8, 3, 32, 32]
    assert meta.extra["flags"] == ["FP16", "INT8"] and meta.extra["bundle"] == "test"
    assert [p.name for p in engine.parent.iterdir()] and not [p for p in engine.parent.iterdir() if p.name.startswith(".")]


def test_trt11_int8_is_strongly_typed_from_the_fp16_qdq_model(models, tmp_path):
    trt, plan, engine, meta = build_with(TRT11, models, tmp_path)
    asked = trt.builds[-1]
    assert plan.onnx == models["int8_qdq_fp16"] and meta.source_onnx == "int8_qdq_fp16.onnx"
    assert asked["builder_flags"] == [] and meta.strongly_typed
    # 11.1 keeps STRONGLY_TYPED as a deprecated no-op: every network is strongly typed, no flag is set.
    assert hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and asked["network_flags"] == []


def test_dla_with_gpu_fallback_and_the_legacy_cache(models, tmp_path):
    cache = calibration_cache.write_legacy_cache({"input": 2.5, "relu1": 4.0}, "10.3.0", tmp_path / "calibration.cache")
    trt, plan, engine, meta = build_with(TRT10, models, tmp_path, dict(dla_core=1), cache=cache)
    asked = trt.builds[-1]
    assert asked["device"] == "DLA" and asked["dla_core"] == 1
    assert asked["builder_flags"] == ["FP16", "GPU_FALLBACK", "INT8"]
    assert asked["calibration_cache"] == cache.read_text()  # the calibrator hands TensorRT the cache
    # DLA supports no dynamic dimensions: the batch range 1..8 of the options gives way to min = opt = max.
    static = {"input": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [1, 3, 32, 32]}}
    assert asked["profiles"] == [static] and asked["calibration_profile"] == static
    assert meta.static_shapes and meta.input_shapes == static["input"]
    assert plan.onnx == models["fp32"] and meta.dla_core == 1 and meta.extra["calibration_cache"] == "calibration.cache"


def test_dla_core_must_exist(models, tmp_path):
    trt = make_tensorrt(dla_cores=0, **TRT10)
    opts = options(precision="fp16", dla_core=0)
    plan = plan_build(detect_features(trt), opts, models)
    with pytest.raises(PipelineError, match="this device has 0 DLA cores"):
        build_engine(plan, opts, tmp_path / "model.engine", trt=trt, device=DEVICE)


def test_missing_calibration_cache_file_is_named(models, tmp_path):
    trt = make_tensorrt(**TRT10)
    opts = options(dla_core=0)
    plan = plan_build(detect_features(trt), opts, models, calibration_cache=tmp_path / "absent.cache")
    with pytest.raises(PipelineError, match="absent.cache: calibration cache not found"):
        build_engine(plan, opts, tmp_path / "model.engine", trt=trt, device=DEVICE)


def test_marked_outputs_are_asked_for_and_unknown_ones_refused(models, tmp_path):
    trt, plan, engine, meta = build_with(TRT10, models, tmp_path, dict(mark_outputs=("relu1", "relu2", "logits")))
    assert trt.builds[-1]["outputs"] == ["logits", "relu1", "relu2"]
    assert meta.extra["marked_outputs"] == ["relu1", "relu2"]
    with pytest.raises(PipelineError, match="no tensors named \\['nowhere'\\]"):
        build_with(TRT10, models, tmp_path, dict(mark_outputs=("nowhere",)))


def test_parser_errors_are_one_pipeline_error(tmp_path, models):
    bad = tmp_path / "int8_qdq.onnx"
    bad.write_bytes(b"not an onnx file")
    trt = make_tensorrt(**TRT10)
    opts = options()
    plan = plan_build(detect_features(trt), opts, {**models, "int8_qdq": bad})
    with pytest.raises(PipelineError, match="cannot parse .*int8_qdq.onnx: In node"):
        build_engine(plan, opts, tmp_path / "model.engine", trt=trt, device=DEVICE)
    other_input = options(input_name="images")
    with pytest.raises(PipelineError, match="no input named 'images'"):
        build_engine(plan_build(detect_features(trt), other_input, models), other_input, tmp_path / "m.engine",
                     trt=trt, device=DEVICE)


def test_a_failed_build_leaves_nothing_half_written(models, tmp_path):
    trt, plan, engine, meta = build_with(TRT10, models, tmp_path)
    before = engine.read_bytes(), metadata_path(engine).read_text()
    failing = make_tensorrt(fail_build=True, **TRT10)
    opts = options(timing_cache=tmp_path / "timing.cache")
    with pytest.raises(PipelineError, match="could not build an engine .*refused on purpose"):
        build_engine(plan, opts, engine, trt=failing, device=DEVICE)
    assert (engine.read_bytes(), metadata_path(engine).read_text()) == before
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]


def test_build_without_tensorrt_says_why(models, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is importable here")
    except ImportError:
        pass
    plan = BuildPlan(models["fp32"], False, (), None, "")
    with pytest.raises(PipelineError, match="TensorRT's Python module is not installed"):
        build_engine(plan, options(precision="fp32"), tmp_path / "model.engine", device=DEVICE)


# ----------------------------------------------------------------------------- legacy calibration cache


@pytest.fixture(scope="module")
def real_table(models, imagenet):
    """A calibration table of the tiny model on 16 real ImageNet evaluation images (the project's code)."""
    from calibration.imagenet import open_imagenet
    from calibration.images import load_images
    from calibration.preprocess import Preprocessing
    from calibration.statistics import collect_ranges

    records = open_imagenet(imagenet).evaluation.records[:16]
    pre = Preprocessing(crop=32, crop_pct=0.875)
    crops = load_images(records, pre).crops
    batches = [pre.normalize(crops[i:i + 8]) for i in range(0, len(crops), 8)]
    names = ["input", "relu1", "relu2", "pool", "logits"]
    table = collect_ranges(models["fp32"], names, batches, method="percentile", threads=1)
    return json.loads(table.to_json())


def test_cache_header_encodes_the_version_as_tensorrt_does():
    assert calibration_cache.cache_header("8.6.1") == "TRT-8601-EntropyCalibration2"
    assert calibration_cache.cache_header("10.3.0") == "TRT-100300-EntropyCalibration2"
    assert calibration_cache.cache_header("10.3.0.30") == "TRT-100300-EntropyCalibration2"
    assert calibration_cache.cache_header("10.14.1") == "TRT-101401-EntropyCalibration2"
    assert calibration_cache.cache_header("10.16.1.11") == "TRT-101601-EntropyCalibration2"
    with pytest.raises(PipelineError, match="cannot read the TensorRT version"):
        calibration_cache.cache_header("unknown")


@pytest.mark.parametrize("version, header", [("10.3.0", "TRT-100300-EntropyCalibration2"),
                                             ("10.16.1", "TRT-101601-EntropyCalibration2")])
def test_legacy_cache_from_a_real_table_round_trips_bit_for_bit(real_table, tmp_path, version, header):
    amax = calibration_cache.amax_from_table(real_table)
    assert set(amax) == set(real_table["tensors"]) and len(amax) == 5
    path = calibration_cache.write_legacy_cache(amax, version, tmp_path / "engines" / "calibration.cache")
    lines = path.read_text().splitlines()
    assert lines[0] == header and len(lines) == 1 + len(amax)
    read_header, scales = calibration_cache.read_legacy_cache(path)
    assert read_header == header and list(scales) == list(amax)
    for name, value in amax.items():
        expected = np.float32(value / 127)
        assert np.float32(scales[name]).view(np.uint32) == expected.view(np.uint32)
        hex_text = dict(line.rsplit(": ", 1) for line in lines[1:])[name]
        assert int(hex_text, 16) == struct.unpack(">I", struct.pack(">f", expected))[0]  # big-endian float32 bits
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_known_scale_encoding():
    # 1.0 is 0x3f800000 in IEEE-754 float32; amax 127 -> scale 1.0.
    assert calibration_cache.scale_hex(1.0) == "3f800000"
    assert calibration_cache.scale_hex(127.0 / 127) == "3f800000"
    assert calibration_cache.hex_scale("3c010204") == struct.unpack(">f", bytes.fromhex("3c010204"))[0]


@pytest.mark.parametrize("table, words", [
    ({"format": "other/1", "tensors": {}}, "format 'other/1'"),
    ({"format": "inception-edge-calibration/1", "tensors": {}}, "no tensors"),
    ({"format": "inception-edge-calibration/1", "tensors": {"x": {"amax": 0}}}, "amax of 'x'"),
    ({"format": "inception-edge-calibration/1", "tensors": {"x": {"amax": "1"}}}, "amax of 'x'"),
    ([1, 2], "format 'list'"),
])
def test_bad_tables_are_refused(table, words):
    with pytest.raises(PipelineError, match=words):
        calibration_cache.amax_from_table(table)


def test_bad_cache_files_are_named(tmp_path):
    path = tmp_path / "calibration.cache"
    path.write_text("hello\n")
    with pytest.raises(PipelineError, match="not a TensorRT calibration cache"):
        calibration_cache.read_legacy_cache(path)
    path.write_text("TRT-100300-EntropyCalibration2\nrelu1 3c010204\n")
    with pytest.raises(PipelineError, match="line 2"):
        calibration_cache.read_legacy_cache(path)
    with pytest.raises(PipelineError, match="not found"):
        calibration_cache.read_legacy_cache(tmp_path / "none.cache")


# ----------------------------------------------------------------------------- metadata


def sample_metadata(**changes) -> EngineMetadata:
    values = dict(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", l4t_release="36.4.3",
                  precision="int8", strongly_typed=False, input_name="input",
                  input_shapes={"min": [1, 3, 224, 224], "opt": [1, 3, 224, 224], "max": [8, 3, 224, 224]},
                  source_onnx="int8_qdq.onnx", source_onnx_sha256="0" * 64, dla_core=-1,
                  built_at="2026-11-25T12:00:00+00:00", pipeline_version="0.1.0")
    values.update(changes)
    return EngineMetadata(**values)


def test_metadata_round_trip_and_bad_files(tmp_path):
    meta = sample_metadata(extra={"flags": ["FP16", "INT8"]})
    path = meta.save(tmp_path / "model.engine.json")
    assert EngineMetadata.load(path) == meta
    assert json.loads(path.read_text())["format"] == metadata.FORMAT
    with pytest.raises(PipelineError, match="engine metadata missing: rebuild it"):
        EngineMetadata.load(tmp_path / "none.json")
    path.write_text("{")
    with pytest.raises(PipelineError, match="unreadable engine metadata"):
        EngineMetadata.load(path)
    path.write_text(json.dumps({"format": metadata.FORMAT, "precision": "int8"}))
    with pytest.raises(PipelineError, match="lacks tensorrt_version"):
        EngineMetadata.load(path)


def test_compatible_engine_passes_and_a_mismatch_is_one_line():
    meta = sample_metadata()
    check_compatible(meta, "10.3.0", "Orin", "8.7")
    for trt_version, gpu, capability in (("10.13.3", "Orin", "8.7"), ("10.3.0", "NVIDIA GeForce RTX 4090", "8.9")):
        with pytest.raises(PipelineError) as caught:
            check_compatible(meta, trt_version, gpu, capability, engine="engines/int8/model.engine")
        message = str(caught.value)
        assert "\n" not in message
        assert message == (f"engines/int8/model.engine: engine built for Orin (sm 87) with TensorRT 10.3.0; this is "
                           f"{gpu} (sm {capability.replace('.', '')}) with TensorRT {trt_version}: "
                           "rebuild it with `python -m pipeline device-build BUNDLE`")


def test_runner_checks_metadata_before_touching_tensorrt(tmp_path):
    from targets.tensorrt.runner import TensorRtRunner

    with pytest.raises(PipelineError, match="engine metadata missing"):
        TensorRtRunner(tmp_path / "model.engine")
    sample_metadata().save(tmp_path / "model.engine.json")
    with pytest.raises(PipelineError, match="engine missing: rebuild it"):
        TensorRtRunner(tmp_path / "model.engine")


# ----------------------------------------------------------------------------- trtexec


def gpu_manifest(precision: str = "int8", target: str = "jetson", dla_core: int = -1) -> dict:
    return {
        "target": target, "precision": precision,
        "input": {"name": "input", "layout": "NCHW", "size": 224, "dtype": "float32"},
        "artifacts": {
            "fp32": {"file": "models/fp32.onnx", "kind": "onnx"},
            "fp16": {"file": "models/fp16.onnx", "kind": "onnx"},
            "int8": {"file": "models/int8_qdq.onnx", "kind": "onnx", "strongly_typed": "models/int8_qdq_fp16.onnx",
                     "fallback": "models/int8_qdq_fallback.onnx", "calibration": "calibration.json"},
        },
        "tensorrt": {"min_batch": 1, "opt_batch": 2, "max_batch": 8, "workspace_mib": 2048, "dla_core": dla_core,
                     "timing_cache": "tensorrt-timing.cache"},
    }


def test_trtexec_lines_for_int8_on_jetson():
    manifest = gpu_manifest(dla_core=0)
    manifest["tensorrt"]["dla_batch"] = 2
    lines = trtexec.command_lines(manifest)
    comments, commands = lines[0::2], lines[1::2]
    assert all(c.startswith("# ") for c in comments) and all(c.startswith("trtexec ") for c in commands)
    assert "TensorRT 10.x" in comments[0] and "TensorRT 11" in comments[1] and "DLA core 0" in comments[2]
    assert "--onnx=models/int8_qdq.onnx --fp16 --int8" in commands[0]
    assert "--stronglyTyped --onnx=models/int8_qdq_fp16.onnx" in commands[1]
    assert ("--onnx=models/fp32.onnx --useDLACore=0 --allowGPUFallback --int8 --fp16 "
            "--calib=engines/calibration.cache") in commands[2]
    for command in commands[:2]:  # GPU engines: the dynamic batch profile
        assert "--minShapes=input:1x3x224x224 --optShapes=input:2x3x224x224 --maxShapes=input:8x3x224x224" in command
    # DLA: static shapes at tensorrt.dla_batch, one engine named by it
    assert "--minShapes=input:2x3x224x224 --optShapes=input:2x3x224x224 --maxShapes=input:2x3x224x224" in commands[2]
    assert "--saveEngine=engines/trtexec-int8-dla0-b2.engine" in commands[2]
    for command in commands:
        assert "--memPoolSize=workspace:2048M --timingCacheFile=engines/tensorrt-timing.cache" in command
        assert " --saveEngine=engines/" in command
    assert trtexec.files_named(lines) == ["models/int8_qdq.onnx", "models/int8_qdq_fp16.onnx", "models/fp32.onnx"]
    assert "engines/calibration.cache" in trtexec.files_named(lines, device_files=True)


def test_no_dla_trtexec_line_without_a_dla_core():
    """Orin Nano has no DLA: a Jetson bundle with dla_core -1 gets GPU lines only."""
    lines = trtexec.command_lines(gpu_manifest(dla_core=-1))
    assert len(lines) == 4 and not any("DLA" in line or "--useDLACore" in line for line in lines)


def test_trtexec_lines_for_desktop_fp16_and_fp32():
    fp16 = trtexec.command_lines(gpu_manifest("fp16", "desktop-gpu"))
    assert len(fp16) == 4 and "--onnx=models/fp32.onnx --fp16" in fp16[1]
    assert "--stronglyTyped --onnx=models/fp16.onnx" in fp16[3]
    assert not any("--useDLACore" in line for line in fp16)
    assert trtexec.files_named(trtexec.command_lines(gpu_manifest("fp32", "desktop-gpu"))) == ["models/fp32.onnx"]
    desktop_int8 = trtexec.command_lines(gpu_manifest("int8", "desktop-gpu"))
    assert len(desktop_int8) == 4  # no DLA on desktop GPUs unless dla_core says so


TRTEXEC_SUMMARY = """\
[11/25/2026-15:02:11] [I] === Performance summary ===
[11/25/2026-15:02:11] [I] Throughput: 1612.45 qps
[11/25/2026-15:02:11] [I] Latency: min = 0.6521 ms, max = 1.9843 ms, mean = 0.6912 ms, median = 0.6853 ms, percentile(90%) = 0.7102 ms, percentile(95%) = 0.7260 ms, percentile(99%) = 0.8124 ms
[11/25/2026-15:02:11] [I] Enqueue Time: min = 0.0911 ms, max = 0.3312 ms, mean = 0.1043 ms, median = 0.1021 ms, percentile(90%) = 0.1125 ms, percentile(95%) = 0.1188 ms, percentile(99%) = 0.1542 ms
[11/25/2026-15:02:11] [I] H2D Latency: min = 0.0412 ms, max = 0.0903 ms, mean = 0.0451 ms, median = 0.0447 ms, percentile(90%) = 0.0470 ms, percentile(95%) = 0.0481 ms, percentile(99%) = 0.0532 ms
[11/25/2026-15:02:11] [I] GPU Compute Time: min = 0.6012 ms, max = 1.9011 ms, mean = 0.6201 ms, median = 0.6154 ms, percentile(90%) = 0.6380 ms, percentile(95%) = 0.6493 ms, percentile(99%) = 0.7311 ms
[11/25/2026-15:02:11] [I] D2H Latency: min = 0.0031 ms, max = 0.0112 ms, mean = 0.0040 ms, median = 0.0038 ms, percentile(90%) = 0.0045 ms, percentile(95%) = 0.0050 ms, percentile(99%) = 0.0071 ms
[11/25/2026-15:02:11] [I] Total Host Walltime: 3.00123 s
[11/25/2026-15:02:11] [I] Total GPU Compute Time: 2.99812 s
"""


def test_parse_trtexec_summary():
    parsed = trtexec.parse_trtexec(TRTEXEC_SUMMARY)
    assert parsed["throughput_qps"] == 1612.45
    assert parsed["gpu_compute_ms"]["median"] == 0.6154 and parsed["gpu_compute_ms"]["mean"] == 0.6201
    assert parsed["gpu_compute_ms"]["p99"] == 0.7311 and parsed["gpu_compute_ms"]["p90"] == 0.6380
    assert parsed["latency_ms"]["median"] == 0.6853 and parsed["latency_ms"]["p99"] == 0.8124
    assert trtexec.parse_trtexec("no summary here") == {}


def test_run_trtexec_is_none_without_trtexec(tmp_path):
    if trtexec.trtexec_path() is not None:
        pytest.skip("trtexec is installed here")
    assert trtexec.run_trtexec(tmp_path / "model.engine", "input:1x3x224x224", 1.0) is None


def test_run_trtexec_passes_the_engine_shape_and_dla_core(tmp_path, monkeypatch):
    """A stand-in `trtexec` script (labelled: not NVIDIA's) records its arguments and prints a summary."""
    if trtexec.trtexec_path() is not None:
        pytest.skip("a real trtexec is installed here")
    (tmp_path / "summary.txt").write_text(TRTEXEC_SUMMARY)
    script = tmp_path / "bin" / "trtexec"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\n# stand-in for NVIDIA's trtexec (test only)\necho \"$@\" > {tmp_path}/args\n"
                      f"cat {tmp_path}/summary.txt\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    result = trtexec.run_trtexec(tmp_path / "model.engine", "input:1x3x224x224", 2.0, dla_core=0)
    assert (tmp_path / "args").read_text().split() == [
        f"--loadEngine={tmp_path / 'model.engine'}", "--shapes=input:1x3x224x224", "--duration=2", "--warmUp=500",
        "--useDLACore=0"]
    assert result["throughput_qps"] == 1612.45 and result["gpu_compute_ms"]["median"] == 0.6154
    assert "error" not in result


# ----------------------------------------------------------------------------- this machine


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def gpu_present() -> bool:
    try:
        device_info.gpu_description()
    except PipelineError:
        return False
    return True


def test_tensorrt_status_gives_the_reason_here():
    ok, reason = device_info.tensorrt_status()
    if tensorrt_importable() and gpu_present():
        assert ok and reason.startswith("TensorRT ")
        return
    assert not ok and "\n" not in reason
    if not tensorrt_importable():
        assert reason == device_info.NO_TENSORRT
        assert "cannot be installed on development machines" in reason


def test_gpu_description_without_a_driver_is_a_pipeline_error():
    pytest.importorskip("cuda.bindings", reason="cuda-python 12.6+ is not installed")
    if gpu_present():
        gpu = device_info.gpu_description()
        assert gpu["name"] and "." in gpu["compute_capability"]
        return
    # cuda-python 13.x reports a CUDA error; 12.x (the JetPack 6 pin) cannot even load libcuda.
    with pytest.raises(PipelineError, match=r"^(cudaGetDeviceCount failed: cudaError\w+ \(.+\)|no NVIDIA driver here \(.+\))$"):
        device_info.gpu_description()


def test_jetson_info_reads_a_jetson_tree(tmp_path):
    if not Path("/etc/nv_tegra_release").exists():
        assert device_info.jetson_info() is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    for core, khz in ((0, 2201600), (1, 1728000)):
        folder = tmp_path / f"sys/devices/system/cpu/cpu{core}/cpufreq"
        folder.mkdir(parents=True)
        (folder / "scaling_cur_freq").write_text(f"{khz}\n")
    (tmp_path / "sys/class/devfreq/17000000.gpu").mkdir(parents=True)
    (tmp_path / "sys/class/devfreq/17000000.gpu/cur_freq").write_text("1300500000\n")
    info = device_info.jetson_info(tmp_path)
    assert info["l4t_release"] == "36.4.3" and info["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert info["clocks_mhz"] == {"cpu": {"cpu0": 2202, "cpu1": 1728}, "gpu": 1300}
    assert info["power_mode"] is None  # commands run only on the real root
    assert device_info.jetson_info(tmp_path / "elsewhere") is None


def test_jetson_info_reads_the_jetpack_5_gpu_clock(tmp_path):
    """JetPack 5 (L4T 35) names the Orin GPU's devfreq node after its chip: 17000000.ga10b."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref\n")
    folder = tmp_path / "sys/devices/17000000.ga10b/devfreq/17000000.ga10b"
    folder.mkdir(parents=True)
    (folder / "cur_freq").write_text("624750000\n")
    info = device_info.jetson_info(tmp_path)
    assert info["l4t_release"] == "35.5.0" and info["clocks_mhz"] == {"gpu": 625}


def test_parse_nvpmodel():
    assert device_info.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert device_info.parse_nvpmodel("NVPM WARN: ...\nNV Power Mode: 15W\n2\n") == {"name": "15W", "id": 2}
    assert device_info.parse_nvpmodel("") is None


# ----------------------------------------------------------------------------- device-side code rules


def test_every_module_parses_as_python_310():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "builder.py", "calibration_cache.py", "metadata.py",
                                       "runner.py", "device_info.py", "trtexec.py"}
    for file in files:
        ast.parse(file.read_text(), filename=str(file), feature_version=(3, 10))
        assert "tomllib" not in file.read_text()


def test_importing_the_package_needs_no_torch_onnx_or_tensorrt():
    code = ("import sys\n"
            "for name in ('torch', 'onnx', 'onnxsim', 'tensorrt', 'onnxruntime', 'openvino'):\n"
            "    sys.modules[name] = None\n"
            "import targets.tensorrt.builder, targets.tensorrt.runner, targets.tensorrt.trtexec\n"
            "import targets.tensorrt.calibration_cache, targets.tensorrt.metadata, targets.tensorrt.device_info\n"
            "print(targets.tensorrt.device_info.tensorrt_status()[0])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ----------------------------------------------------------------------------- real TensorRT


real_tensorrt = pytest.mark.skipif(not (tensorrt_importable() and gpu_present()),
                                   reason="TensorRT is not importable here (no NVIDIA TensorRT and GPU on development machines)")


@real_tensorrt
@pytest.mark.parametrize("precision, max_abs", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_real_engine_matches_onnx_runtime(tmp_path, precision, max_abs):
    import tensorrt as trt

    from targets.onnxruntime import OnnxRuntimeRunner
    from targets.tensorrt.runner import TensorRtRunner

    onnx_path = tiny_onnx(tmp_path / "fp32.onnx")
    opts = options(precision=precision, timing_cache=tmp_path / "timing.cache", mark_outputs=("relu1",))
    plan = plan_build(detect_features(trt), opts, {"fp32": onnx_path, "fp16": onnx_path})
    engine = tmp_path / "engines" / "model.engine"
    meta = build_engine(plan, opts, engine)
    assert meta.tensorrt_version == trt.__version__ and (tmp_path / "timing.cache").is_file()
    # The engine inspector's read-back (detailed verbosity) on the real engine
    assert meta.placement.get("detailed") and meta.placement["layers"] >= 1 and meta.placement["on_dla"] == 0
    x = np.random.default_rng(3).normal(0, 1, (5, 3, 32, 32)).astype(np.float32)
    expected = OnnxRuntimeRunner(onnx_path).run({"input": x})["logits"]
    with TensorRtRunner(engine) as runner:
        out = runner.run({"input": x})
        assert set(out) == {"logits", "relu1"} and out["relu1"].shape == (5, 8, 32, 32)
        assert np.max(np.abs(out["logits"] - expected)) < max_abs
        runner.start({"input": x[:2]})
        assert np.array_equal(runner.wait()["logits"], runner.run({"input": x[:2]})["logits"])
        with pytest.raises(PipelineError, match="outside the engine's profile"):
            runner.run({"input": np.zeros((9, 3, 32, 32), np.float32)})
    stale = EngineMetadata.load(metadata_path(engine))
    EngineMetadata(**{**stale.__dict__, "tensorrt_version": "0.0.1"}).save(metadata_path(engine))
    with pytest.raises(PipelineError, match="rebuild it with"):
        TensorRtRunner(engine)


def dla_cores() -> int:
    try:
        import tensorrt as trt

        return trt.Builder(trt.Logger(trt.Logger.WARNING)).num_DLA_cores
    except Exception:  # noqa: BLE001 (no TensorRT, no GPU)
        return 0


@real_tensorrt
@pytest.mark.skipif(dla_cores() < 1, reason="no TensorRT with a DLA core here (DLA: Jetson AGX Orin / Orin NX only)")
def test_real_dla_engine_has_static_shapes_and_says_where_it_ran(tmp_path):
    import tensorrt as trt

    from targets.tensorrt import placement
    from targets.tensorrt.runner import TensorRtRunner

    onnx_path = tiny_onnx(tmp_path / "fp32.onnx")
    opts = options(precision="fp16", dla_core=0, dla_batch=2)
    plan = plan_build(detect_features(trt), opts, {"fp32": onnx_path, "fp16": onnx_path})
    meta = build_engine(plan, opts, tmp_path / "model.engine")
    assert meta.static_shapes and meta.input_shapes["min"] == meta.input_shapes["max"] == [2, 3, 32, 32]
    assert meta.placement["detailed"] and meta.placement["on_dla"] >= 1, placement.summary(meta.placement, 0)
    with TensorRtRunner(tmp_path / "model.engine") as runner:
        assert runner.run({"input": np.zeros((2, 3, 32, 32), np.float32)})["logits"].shape == (2, 10)
        with pytest.raises(PipelineError, match="takes batch 2 only"):
            runner.run({"input": np.zeros((1, 3, 32, 32), np.float32)})
