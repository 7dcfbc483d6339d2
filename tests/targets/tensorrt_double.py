"""TEST DOUBLE of NVIDIA's `tensorrt` Python module: not TensorRT, builds no real engine.

TensorRT cannot be installed on the development machines, so this module stands in for it in one
kind of test only: that `targets.tensorrt.builder` asks TensorRT for what the configuration says
(which ONNX, network creation flags, builder flags, workspace limit, optimization profile, timing
cache, DLA core and GPU fallback, calibrator, marked outputs). It offers only classes, enums and
methods that the real API has (TensorRT 10.x and, for the 11.x flavour, without the FP16/INT8
builder flags and the calibrators), rejects attributes the real objects do not have, and records
every request. The parser reads the real ONNX file's input and node-output names (with `onnx`),
so tensor names are those of the real model. The "engine" it returns is a JSON record of the
request, useless to any real runtime. Numerical results are never tested against it.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path


class _Strict:
    """Refuses attributes the real TensorRT object does not have (catches API misuse in the builder)."""

    _attributes: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        if not name.startswith("_") and name not in self._attributes:
            raise AttributeError(f"TensorRT test double: {type(self).__name__} has no attribute {name!r}")
        object.__setattr__(self, name, value)


class Tensor:
    def __init__(self, name: str, shape: tuple):
        self.name, self.shape = name, tuple(shape)


class Layer:
    def __init__(self, outputs: list[Tensor]):
        self._outputs = outputs

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> Tensor:
        return self._outputs[index]


class INetworkDefinition:
    def __init__(self, flags: int):
        self.creation_flags = flags
        self._inputs: list[Tensor] = []
        self._layers: list[Layer] = []
        self._outputs: list[Tensor] = []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_layer(self, index):
        return self._layers[index]

    def get_output(self, index):
        return self._outputs[index]

    def mark_output(self, tensor: Tensor) -> None:
        self._outputs.append(tensor)


class IParserError:
    def __init__(self, text: str):
        self._text = text

    def desc(self) -> str:
        return self._text

    def __str__(self) -> str:
        return f"In node -1 (parseGraph): {self._text}"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger):
        self.network, self._errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as error:
            self._errors.append(IParserError(f"INVALID_GRAPH: {type(error).__name__}: cannot read the model"))
            return False
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        for value in graph.input:
            if value.name in initializers:
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self.network._inputs.append(Tensor(value.name, dims))
        tensors = {}
        for node in graph.node:
            outputs = [Tensor(name, ()) for name in node.output]
            tensors.update((t.name, t) for t in outputs)
            self.network._layers.append(Layer(outputs))
        for value in graph.output:
            self.network._outputs.append(tensors[value.name])
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> IParserError:
        return self._errors[index]


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 (the real keyword names)
        self.shapes[name] = {"min": list(min), "opt": list(opt), "max": list(max)}


class ITimingCache:
    def __init__(self, data: bytes):
        self.loaded = bytes(data)

    def serialize(self) -> bytes:
        return self.loaded + b"timings;"  # what a build adds to the cache


def make_tensorrt(version: str = "10.3.0", strongly_typed_only: bool = False, dla_cores: int = 2,
                  strongly_typed_flag: bool | None = None, fail_build: bool = False) -> types.ModuleType:
    """A `tensorrt`-shaped module: TensorRT 10.x-like by default, 11.x-like with strongly_typed_only."""
    trt = types.ModuleType("tensorrt")
    trt.__doc__ = "TEST DOUBLE of the tensorrt module (tests/targets/tensorrt_double.py)"
    trt.__version__ = version
    trt.builds = []  # one record per build_serialized_network call

    flags = ["GPU_FALLBACK", "REFIT", "DEBUG", "STRICT_TYPES", "DIRECT_IO", "SPARSE_WEIGHTS"]
    if not strongly_typed_only:
        flags = ["FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS"] + flags
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    if strongly_typed_flag is None:
        strongly_typed_flag = not strongly_typed_only
    network_flags = ["EXPLICIT_BATCH"] + (["STRONGLY_TYPED"] if strongly_typed_flag else [])
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", network_flags, start=0)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM"], start=0)
    trt.DeviceType = enum.IntEnum("DeviceType", ["GPU", "DLA"], start=0)
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], start=0)

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0)
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    class Logger(ILogger):
        def __init__(self, min_severity=None):
            self.min_severity = min_severity

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.OnnxParser = OnnxParser

    config_attributes = ("default_device_type", "DLA_core") + (() if strongly_typed_only else ("int8_calibrator",))

    class IBuilderConfig(_Strict):
        _attributes = config_attributes

        def __init__(self):
            self._flags, self._pools, self._profiles, self._timing = set(), {}, [], None
            self._calibration_profile = None
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            if not strongly_typed_only:
                self.int8_calibrator = None

        def set_flag(self, flag):
            self._flags.add(trt.BuilderFlag(flag))

        def get_flag(self, flag):
            return trt.BuilderFlag(flag) in self._flags

        def set_memory_pool_limit(self, pool, pool_size):
            self._pools[trt.MemoryPoolType(pool)] = int(pool_size)

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            self._timing = (cache, bool(ignore_mismatch))
            return True

        def get_timing_cache(self):
            return self._timing[0] if self._timing else None

    if not strongly_typed_only:
        def set_calibration_profile(self, profile):
            self._calibration_profile = profile
            return True

        IBuilderConfig.set_calibration_profile = set_calibration_profile

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            self.num_DLA_cores = dla_cores

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            calibrator = getattr(config, "int8_calibrator", None)
            record = {
                "network_flags": [f.name for f in trt.NetworkDefinitionCreationFlag
                                  if network.creation_flags & (1 << int(f))],
                "builder_flags": sorted(f.name for f in config._flags),
                "workspace": config._pools.get(trt.MemoryPoolType.WORKSPACE),
                "profiles": [p.shapes for p in config._profiles],
                "calibration_profile": config._calibration_profile.shapes if config._calibration_profile else None,
                "device": trt.DeviceType(config.default_device_type).name,
                "dla_core": config.DLA_core,
                "timing_cache_loaded": config._timing[0].loaded.decode("latin-1") if config._timing else None,
                "timing_cache_ignore_mismatch": config._timing[1] if config._timing else None,
                "calibration_cache": calibrator.read_calibration_cache().decode() if calibrator else None,
                "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
            }
            trt.builds.append(record)
            if fail_build:
                self.logger.log(ILogger.ERROR, "test double: build refused on purpose")
                return None
            return b"TRT-TEST-DOUBLE-ENGINE\n" + json.dumps(record).encode()

    trt.Builder = Builder
    return trt


def engine_record(path: str | Path) -> dict:
    """The request a test-double engine file records."""
    header, _, body = Path(path).read_bytes().partition(b"\n")
    assert header == b"TRT-TEST-DOUBLE-ENGINE", "not an engine written by the TensorRT test double"
    return json.loads(body)
