"""The TensorRT API as a contract: every `tensorrt` name our code touches exists in the release it serves.

The reference lists (tests/data/tensorrt_api/, NVIDIA's binding sources of 10.3 and 11.1) are the
truth. Each feature-detected branch of `targets.tensorrt` (10.x flags, 11.x strongly typed, DLA, the
runner) runs against the test double of the version it serves; the double offers only names of that
version's list and records each one asked for, so a name the release lacks either fails the run or
shows up in `refused` (where a `getattr(..., default)` would have hidden it). A static read of the
source adds the names the runs cannot reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from targets.tensorrt.builder import (
    EngineOptions,
    build_engine,
    detect_features,
    plan_build,
)
from targets.tensorrt.calibration_cache import write_legacy_cache
from tests.targets import tensorrt_api
from tests.targets.cuda_double import make_cudart
from tests.targets.tensorrt_double import _Strict, make_tensorrt
from tests.targets.test_tensorrt import DEVICE, tiny_onnx

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (sorted((ROOT / "targets" / "tensorrt").glob("*.py")) + sorted((ROOT / "pipeline" / "runtime").glob("*.py"))
           + [ROOT / "pipeline" / "device_build.py", ROOT / "pipeline" / "device_check.py"])
# Names our code probes with hasattr() to pick a branch: absent on some release by design.
PROBES = {"BuilderFlag.INT8", "BuilderFlag.FP16", "IInt8EntropyCalibrator2"}
# Deprecated names a branch may use, with the reason: implicit INT8 is what DLA takes on JetPack 6.
DEPRECATED_OK = {"10.3": {"IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator",
                          "IBuilderConfig.set_calibration_profile"}, "11.1": set()}

# (API list, request, names the branch must have touched: proof that the recording sees the branch)
BRANCHES = [
    ("10.3", dict(precision="int8"), {"BuilderFlag.INT8", "BuilderFlag.FP16", "IBuilderConfig.set_flag"}),
    ("10.3", dict(precision="fp16"), {"BuilderFlag.FP16"}),
    ("10.3", dict(precision="fp32"), {"Builder.create_network"}),
    ("10.3", dict(precision="int8", dla_core=0),
     {"IBuilderConfig.int8_calibrator", "DeviceType.DLA", "IBuilderConfig.DLA_core", "BuilderFlag.GPU_FALLBACK"}),
    ("10.3", dict(precision="fp16", dla_core=1), {"DeviceType.DLA", "Runtime.DLA_core"}),
    ("11.1", dict(precision="int8"), {"OnnxParser.parse_from_file", "ProfilingVerbosity.DETAILED"}),
    ("11.1", dict(precision="fp16"), {"IBuilderConfig.set_memory_pool_limit"}),
    ("11.1", dict(precision="int8", dla_core=0), {"DeviceType.DLA", "BuilderFlag.GPU_FALLBACK"}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("api-models")
    source = tiny_onnx(folder / "fp32.onnx")
    return {key: source for key in ("fp32", "fp16", "int8_qdq", "int8_qdq_fp16")}


def run_branch(trt, request_: dict, models, tmp_path, monkeypatch) -> None:
    """Plan, build (placement read back included) and run the engine, all against the doubles."""
    import sys

    import targets.tensorrt.runner as runner_module
    from targets.tensorrt import device_info

    options = EngineOptions(image_size=32, timing_cache=tmp_path / "timing.cache", **request_)
    cache = None
    if request_.get("dla_core", -1) >= 0 and "IInt8EntropyCalibrator2" in trt.api.names:
        cache = write_legacy_cache({"input": 2.5, "conv1": 3.0}, trt.__version__, tmp_path / "calibration.cache")
    plan = plan_build(detect_features(trt), options, models, calibration_cache=cache)
    engine = tmp_path / "model.engine"
    build_engine(plan, options, engine, trt=trt, device=DEVICE)
    cudart = make_cudart()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(device_info, "cudart", lambda: cudart)
    monkeypatch.setattr(runner_module, "cudart", lambda: cudart)
    with runner_module.TensorRtRunner(engine, check_device=False) as runner:
        out = runner.run({"input": np.ones((options.batches[2], 3, 32, 32), np.float32)})
    assert out["logits"].shape == (options.batches[2], 10)


@pytest.mark.parametrize("api, request_, expected", BRANCHES)
def test_every_name_a_branch_touches_is_in_its_release(api, request_, expected, models, tmp_path, monkeypatch):
    trt = make_tensorrt(api)
    run_branch(trt, request_, models, tmp_path, monkeypatch)
    touched = trt.api.touched - {"api", "builds"}
    reference = tensorrt_api.names(api)
    assert expected <= touched, f"the branch did not run as expected: {sorted(expected - touched)} not touched"
    missing = sorted(touched - reference)
    assert not missing, f"TensorRT {api} has no {missing}"
    hidden = sorted(trt.api.refused - PROBES)
    assert not hidden, f"asked TensorRT {api} for {hidden}, which it lacks (hidden behind a default?)"
    deprecated = sorted(touched & tensorrt_api.deprecated(api) - DEPRECATED_OK[api])
    assert not deprecated, f"uses names TensorRT {api} deprecates: {deprecated}"


def _source_names() -> tuple[set[str], set[str]]:
    """(`trt.X.Y` chains, hasattr/getattr probes "X.Y") in the device-side TensorRT code."""
    chains, probes = set(), set()

    def chain(node) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "trt" and parts:
            return ".".join(reversed(parts))
        return None

    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):  # inner chains too: their prefixes are checked alike
                name = chain(node)
                if name:
                    chains.add(name)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                base = node.args[0]
                prefix = "" if isinstance(base, ast.Name) and base.id == "trt" else chain(base)
                if prefix is not None:
                    probes.add(f"{prefix}.{node.args[1].value}".lstrip("."))
    return chains, probes


def test_every_name_in_the_source_exists_in_a_supported_release():
    chains, probes = _source_names()
    every = tensorrt_api.names("10.3") | tensorrt_api.names("11.1")
    prefixes = {name for chain in chains for name in _prefixes(chain)}
    assert {"BuilderFlag", "MemoryPoolType.WORKSPACE", "ProfilingVerbosity.DETAILED", "Logger.WARNING",
            "DataType.FLOAT", "nptype"} <= prefixes  # the builder, the runner and device-check are read
    # pybind11's automatic members (__init__) are not listed; everything else must be.
    unknown = sorted(name for name in prefixes if name not in every and not name.endswith(".__init__"))
    assert not unknown, f"names no supported TensorRT has: {unknown}"
    assert probes >= {"BuilderFlag.INT8", "IInt8EntropyCalibrator2"}
    assert not sorted(probes - every), f"probes for names no supported TensorRT has: {sorted(probes - every)}"
    # A probe is for a name that some supported release lacks; one that every release has is a dead branch.
    # Probes are the feature detection and nothing else (each one a name some release lacks).
    assert probes - {"__version__"} == PROBES, sorted(probes)
    assert all(p not in tensorrt_api.names("11.1") for p in PROBES)


def _prefixes(chain: str) -> list[str]:
    parts = chain.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_methods_of_our_tensorrt_subclasses_are_the_base_class_names():
    """CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2), CollectingLogger(trt.ILogger): what TensorRT calls."""
    found = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "trt":
                        found[node.name] = (base.attr, [f.name for f in node.body if isinstance(f, ast.FunctionDef)])
    assert set(found) == {"CacheOnlyCalibrator", "CollectingLogger"}
    for name, (base, methods) in found.items():
        for method in methods:
            if not method.startswith("__"):
                assert f"{base}.{method}" in tensorrt_api.names("10.3"), f"{name}.{method}: not a {base} method"


def test_the_double_offers_only_names_of_the_reference_lists():
    import tests.targets.tensorrt_double as double

    every = tensorrt_api.names("10.3") | tensorrt_api.names("11.1")
    classes = [c for c in vars(double).values() if isinstance(c, type) and issubclass(c, _Strict) and c._scope]
    trt10, trt11 = make_tensorrt("10.3"), make_tensorrt("11.1")
    for trt in (trt10, trt11):  # the classes made inside make_tensorrt too
        classes += [type(trt.Builder(trt.Logger())), type(trt.Builder(trt.Logger()).create_builder_config()),
                    trt.Runtime]
    for cls in classes:
        for name in vars(cls):
            if not name.startswith("_"):
                assert f"{cls._scope}.{name}" in every, f"the double's {cls._scope}.{name} is in no reference list"
    for api, trt in (("10.3", trt10), ("11.1", trt11)):
        for scope in ("BuilderFlag", "NetworkDefinitionCreationFlag", "DeviceType", "ProfilingVerbosity"):
            assert [m.name for m in getattr(trt, scope)] == [
                m for m in tensorrt_api.members(api, scope) if m.isupper()], f"{api} {scope}"


def test_the_double_refuses_names_the_release_lacks():
    trt10, trt11 = make_tensorrt("10.3"), make_tensorrt("11.1")
    assert not hasattr(trt10.BuilderFlag, "STRICT_TYPES")  # gone before 10.3
    assert "BuilderFlag.STRICT_TYPES" in trt10.api.refused
    assert hasattr(trt10.BuilderFlag, "INT8") and hasattr(trt10, "IInt8EntropyCalibrator2")
    assert not hasattr(trt11.BuilderFlag, "FP16") and not hasattr(trt11.BuilderFlag, "INT8")
    assert not hasattr(trt11, "IInt8EntropyCalibrator2")
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    # 11.1 keeps STRONGLY_TYPED, deprecated
    assert hasattr(trt11.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in tensorrt_api.deprecated("11.1")
    config = trt11.Builder(trt11.Logger()).create_builder_config()
    with pytest.raises(AttributeError, match="IBuilderConfig has no attribute 'int8_calibrator' in TensorRT 11.1"):
        config.int8_calibrator = None
    with pytest.raises(AttributeError, match="set_calibration_profile"):
        config.set_calibration_profile(None)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        trt10.Builder(trt10.Logger()).nothing  # noqa: B018
    hidden = make_tensorrt("10.3", hide=("BuilderFlag.FP16",))
    assert not hasattr(hidden.BuilderFlag, "FP16") and hasattr(hidden.BuilderFlag, "INT8")


def test_a_swallowed_missing_name_is_caught():
    """`getattr(config, "int8_calibrator", None)` on 11.1 returns None, but the contract sees the ask."""
    trt = make_tensorrt("11.1")
    config = trt.Builder(trt.Logger()).create_builder_config()
    assert getattr(config, "int8_calibrator", None) is None
    assert "IBuilderConfig.int8_calibrator" in trt.api.refused - PROBES
