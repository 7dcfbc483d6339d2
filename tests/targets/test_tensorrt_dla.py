"""DLA that really runs: static shapes, placement read back from the engine inspector, the DLA budget,
and a runner that refuses any other batch. Against the labelled TensorRT and CUDA test doubles (no
TensorRT or GPU here); the engine inspector's JSON is parsed from a sample written in its documented form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from targets.tensorrt import placement
from targets.tensorrt.builder import (
    EngineOptions,
    build_engine,
    detect_features,
    plan_build,
)
from targets.tensorrt.metadata import EngineMetadata, metadata_path
from tests.targets.cuda_double import make_cudart
from tests.targets.tensorrt_double import ITensor, make_tensorrt
from tests.targets.test_tensorrt import DEVICE, tiny_onnx

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "engine_information_dla.json"
SAMPLE_LAYERS = ["/stem/conv1/Conv", "/stem/relu1/Relu", "/stem/pool/MaxPool", "/block/concat/Concat",
                 "/head/pool/GlobalAveragePool", "/head/flatten/Flatten", "/head/fc/Gemm"]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("dla") / "fp32.onnx")


def build(trt, onnx_path, tmp_path, **request_):
    options = EngineOptions(image_size=32, **{"precision": "fp16", **request_})
    models = {"fp32": onnx_path, "fp16": onnx_path, "int8_qdq": onnx_path, "int8_qdq_fp16": onnx_path}
    plan = plan_build(detect_features(trt), options, models)
    engine = tmp_path / "model.engine"
    return build_engine(plan, options, engine, trt=trt, device=DEVICE), engine


def test_dla_gets_a_static_profile_at_its_batch(onnx_path, tmp_path):
    trt = make_tensorrt("10.3")
    meta, _ = build(trt, onnx_path, tmp_path, dla_core=0, dla_batch=4, min_batch=1, opt_batch=2, max_batch=8)
    (asked,) = trt.builds
    assert asked["profiles"] == [{"input": {key: [4, 3, 32, 32] for key in ("min", "opt", "max")}}]
    assert asked["device"] == "DLA" and asked["verbosity"] == "DETAILED"
    assert meta.static_shapes and meta.input_shapes["max"] == [4, 3, 32, 32]
    # The GPU keeps its dynamic batch axis.
    meta, _ = build(trt, onnx_path, tmp_path / "gpu", min_batch=1, opt_batch=2, max_batch=8)
    assert not meta.static_shapes and meta.input_shapes["min"][0] == 1 and meta.input_shapes["max"][0] == 8


def test_the_double_refuses_a_dynamic_dla_profile_as_dla_does():
    """The restriction the builder must respect (real TensorRT falls back to the GPU; the double refuses)."""
    trt = make_tensorrt("10.3")
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", [1, 3, 32, 32], [2, 3, 32, 32], [8, 3, 32, 32])
    config.add_optimization_profile(profile)
    config.default_device_type = trt.DeviceType.DLA
    assert builder.build_serialized_network(network, config) is None
    config.default_device_type = trt.DeviceType.GPU
    network._inputs.append(ITensor(trt.api, "input", (-1, 3, 32, 32)))  # an input the engine record can name
    assert builder.build_serialized_network(network, config) is not None  # the same profile on the GPU builds


def test_placement_is_read_back_and_recorded(onnx_path, tmp_path):
    trt = make_tensorrt("10.3")
    meta, engine = build(trt, onnx_path, tmp_path, dla_core=1)
    # tiny_onnx: conv1 relu1 conv2 relu2 pool(GlobalAveragePool) flatten head(Gemm); Flatten is folded,
    # Gemm is no DLA layer in the double.
    assert meta.placement["on_dla"] == 5 and meta.placement["layers"] == 6 and meta.placement["gpu_layers"] == ["head"]
    assert placement.summary(meta.placement, 1) == "5 of 6 layers on DLA 1, 0 in INT8; fell back to GPU: head"
    assert EngineMetadata.load(metadata_path(engine)).placement == meta.placement
    gpu, _ = build(trt, onnx_path, tmp_path / "gpu", precision="int8")
    assert placement.summary(gpu.placement, -1) == "6 layers on the GPU, 6 in INT8"


def test_min_dla_layers_fails_the_build_when_too_much_falls_back(onnx_path, tmp_path):
    trt = make_tensorrt("10.3")
    build(trt, onnx_path, tmp_path / "ok", dla_core=0, min_dla_layers=0.8)  # 5 of 6 = 83%
    with pytest.raises(PipelineError, match=r"5 of 6 layers on DLA 0.*83% on DLA, tensorrt.min_dla_layers asks 90%"):
        build(trt, onnx_path, tmp_path / "strict", dla_core=0, min_dla_layers=0.9)
    assert not (tmp_path / "strict" / "model.engine").exists()  # no engine that breaks the budget


def test_parsing_the_inspector_sample():
    info = placement.parse_engine_information(SAMPLE.read_text(), SAMPLE_LAYERS)
    assert info["detailed"] and info["engine_layers"] == 4  # reformat layers are TensorRT's own
    assert (info["layers"], info["on_dla"], info["int8"]) == (7, 4, 3)
    assert info["gpu_layers"] == ["/head/pool/GlobalAveragePool", "/head/flatten/Flatten", "/head/fc/Gemm"]
    assert info["precisions"] == {"fp16": 3, "fp32": 1, "int8": 3}
    assert placement.summary(info, 0) == ("4 of 7 layers on DLA 0, 3 in INT8; fell back to GPU: "
                                          "/head/pool/GlobalAveragePool, /head/flatten/Flatten, /head/fc/Gemm")
    # Without the network's layer order a DLA subgraph counts its two ends.
    assert placement.parse_engine_information(SAMPLE.read_text())["on_dla"] == 3


def test_names_only_and_broken_information_are_reported_not_guessed():
    names_only = placement.parse_engine_information(json.dumps({"Layers": ["conv1 + relu1", "head"]}))
    assert not names_only["detailed"] and "ProfilingVerbosity.DETAILED" in names_only["note"]
    assert placement.summary(names_only, 0).startswith("placement unknown (layer names only")
    with pytest.raises(PipelineError, match="cannot check tensorrt.min_dla_layers: placement unknown"):
        placement.check_dla_budget(names_only, 0, 0.5)
    placement.check_dla_budget(names_only, 0, 0.0)  # no budget asked: nothing to check
    placement.check_dla_budget(names_only, -1, 0.9)  # GPU engines have no DLA budget
    with pytest.raises(PipelineError, match="not JSON"):
        placement.parse_engine_information("Layers: conv1")


@pytest.fixture()
def cuda(monkeypatch):
    import targets.tensorrt.device_info as device_info
    import targets.tensorrt.runner as runner_module

    cudart = make_cudart()
    monkeypatch.setattr(device_info, "cudart", lambda: cudart)
    monkeypatch.setattr(runner_module, "cudart", lambda: cudart)
    return cudart


def test_the_runner_refuses_another_batch_on_a_static_engine(onnx_path, tmp_path, cuda, monkeypatch):
    from targets.tensorrt.runner import TensorRtRunner

    trt = make_tensorrt("10.3")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    _, engine = build(trt, onnx_path, tmp_path, dla_core=0, dla_batch=2)
    with TensorRtRunner(engine, check_device=False) as runner:
        assert runner.name == "tensorrt fp16 (DLA 0)"
        out = runner.run({"input": np.full((2, 3, 32, 32), 0.5, np.float32)})["logits"]
        assert out.shape == (2, 10) and np.allclose(out, 0.5)  # the double's outputs: the input's mean
        with pytest.raises(PipelineError, match=r"^tensorrt fp16 \(DLA 0\): batch 1, this engine takes batch 2 only "
                                                r"\(static shapes, as DLA needs\): pad the batch or build one with "
                                                r"--dla-batch 1$"):
            runner.run({"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert not cuda.buffers  # every allocation freed on close
    _, dynamic = build(trt, onnx_path, tmp_path / "gpu", max_batch=4)
    with TensorRtRunner(dynamic, check_device=False) as runner:
        assert runner.run({"input": np.zeros((3, 3, 32, 32), np.float32)})["logits"].shape == (3, 10)
        with pytest.raises(PipelineError, match="outside the engine's profile 1..4"):
            runner.run({"input": np.zeros((5, 3, 32, 32), np.float32)})


def test_the_runner_says_where_the_engine_really_runs(onnx_path, tmp_path, cuda, monkeypatch):
    """Asked for DLA but nothing landed there (as a dynamic profile or unsupported layers give): it says GPU."""
    from dataclasses import replace

    from targets.tensorrt.runner import TensorRtRunner

    trt = make_tensorrt("10.3")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    meta, engine = build(trt, onnx_path, tmp_path, dla_core=0)
    with TensorRtRunner(engine, check_device=False) as runner:
        assert runner.name == "tensorrt fp16 (DLA 0)"
        assert runner.describe()["placement"] == "5 of 6 layers on DLA 0, 0 in INT8; fell back to GPU: head"
    on_gpu = {**meta.placement, "on_dla": 0, "gpu_layers": ["everything"]}
    replace(meta, placement=on_gpu).save(metadata_path(engine))
    with TensorRtRunner(engine, check_device=False) as runner:
        assert runner.name == "tensorrt fp16 (GPU: nothing landed on DLA 0)"
        assert runner.describe()["device"].startswith("GPU: nothing landed on DLA 0")
