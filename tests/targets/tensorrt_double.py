"""TEST DOUBLE of NVIDIA's `tensorrt` Python module: not TensorRT, builds no real engine.

TensorRT cannot be installed on the development machines, so this module stands in for it in one
kind of test only: that `targets.tensorrt` asks TensorRT for what the configuration says (which
ONNX, network creation flags, builder flags, workspace limit, optimization profile, timing cache,
DLA core and GPU fallback, calibrator, marked outputs, profiling verbosity) and reads back what
it builds (the engine inspector, the runtime's tensor shapes).

It is generated from, and checked against, NVIDIA's API lists (tests/data/tensorrt_api/): a double
for "10.3" or "11.1" offers exactly the enums and enum values of that list, and every attribute of
its modules, classes and objects must be a name of that list or the access fails as the real module
would (AttributeError). Each access is recorded: `trt.api.touched` (names used) and
`trt.api.refused` (names asked for that the version lacks: a feature probe, or a defect hidden by a
`getattr(..., default)`). `hide` removes more names (a release that dropped them); nothing can add one.

It models one TensorRT rule the project depends on: DLA takes static shapes only (min = opt = max,
TensorRT's DLA restrictions). A DLA build with a dynamic profile is refused here (the real builder
moves every layer to the GPU instead, silently). The parser reads the real ONNX's input, node and
output names (with `onnx`); the "engine" is a JSON record of the request; the runtime's outputs are
a fixed function of the input, useless for numerics, which are never tested against it.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np

from tests.targets import tensorrt_api

ENGINE_HEADER = b"TRT-TEST-DOUBLE-ENGINE"
DLA_OPS = {"Conv", "Relu", "Clip", "MaxPool", "AveragePool", "Concat", "Add", "Mul", "BatchNormalization",
           "GlobalAveragePool"}  # what the double places on DLA (a subset of TensorRT's DLA layer support)


class Api:
    """The names one version offers, and what the code under test asked for."""

    def __init__(self, version: str, hide=()):
        self.version = version
        self.names = tensorrt_api.names(version) - set(hide)
        self.touched: set[str] = set()
        self.refused: set[str] = set()

    def allow(self, path: str) -> bool:
        if path in self.names:
            self.touched.add(path)
            return True
        self.refused.add(path)
        return False

    def missing(self, scope: str, name: str) -> AttributeError:
        return AttributeError(f"TensorRT test double: {scope} has no attribute {name!r} in TensorRT {self.version}'s "
                              "API list")


class _Strict:
    """A double object: its public attributes must be names of its class in the API list."""

    _scope = ""

    def __init__(self, api: Api):
        object.__setattr__(self, "_api", api)

    def __getattribute__(self, name):
        if not name.startswith("_"):
            api, scope = object.__getattribute__(self, "_api"), type(self)._scope
            if not api.allow(f"{scope}.{name}"):
                raise api.missing(scope, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            api, scope = object.__getattribute__(self, "_api"), type(self)._scope
            if not api.allow(f"{scope}.{name}"):
                raise api.missing(scope, name)
        object.__setattr__(self, name, value)


class _StrictClassMeta(type):
    """Class-level access (`trt.ILogger.ERROR`) checked too, for names the double's own class defines."""

    def __getattribute__(cls, name):
        if not name.startswith("_"):
            for base in type.__getattribute__(cls, "__mro__"):
                if "_scope" in base.__dict__ and name in base.__dict__:
                    api = type.__getattribute__(cls, "_api")
                    if not api.allow(f"{base.__dict__['_scope']}.{name}"):
                        raise api.missing(base.__dict__["_scope"], name)
                    break
        return type.__getattribute__(cls, name)


class _RecordingEnum(enum.EnumMeta):
    def __getattr__(cls, name):  # only reached for names the enum lacks
        if not name.startswith("_"):
            cls._api.refused.add(f"{cls._scope}.{name}")
        raise AttributeError(name)

    def __getattribute__(cls, name):
        if not name.startswith("_") and name in type.__getattribute__(cls, "_member_map_"):
            type.__getattribute__(cls, "_api").touched.add(f"{type.__getattribute__(cls, '_scope')}.{name}")
        return super().__getattribute__(name)


class _IntEnum(enum.IntEnum, metaclass=_RecordingEnum):
    pass


def _enum(api: Api, scope: str) -> type:
    values = [m for m in tensorrt_api.members(api.version, scope) if m.isupper() and f"{scope}.{m}" in api.names]
    made = _IntEnum(scope.rpartition(".")[2], values, start=0)
    made._api, made._scope = api, scope
    return made


class _Module(types.ModuleType):
    def __getattribute__(self, name):
        if not name.startswith("_") or name == "__version__":
            api = types.ModuleType.__getattribute__(self, "api") if name != "api" else None
            if api is not None and not api.allow(name):
                raise api.missing("tensorrt", name)
        return types.ModuleType.__getattribute__(self, name)


# ------------------------------------------------------------------------------------------- network


class ITensor(_Strict):
    _scope = "ITensor"

    def __init__(self, api, name: str, shape: tuple):
        super().__init__(api)
        self._name, self._shape = name, tuple(shape)

    name = property(lambda self: self._name)
    shape = property(lambda self: self._shape)


class ILayer(_Strict):
    _scope = "ILayer"

    def __init__(self, api, name: str, op: str, inputs: list[str], outputs: list[ITensor]):
        super().__init__(api)
        self._name, self._op, self._inputs, self._outputs = name, op, inputs, outputs

    name = property(lambda self: self._name)
    num_outputs = property(lambda self: len(self._outputs))

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class INetworkDefinition(_Strict):
    _scope = "INetworkDefinition"

    def __init__(self, api, flags: int):
        super().__init__(api)
        self._flags, self._inputs, self._layers, self._outputs = flags, [], [], []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_layer(self, index):
        return self._layers[index]

    def get_output(self, index):
        return self._outputs[index]

    def mark_output(self, tensor: ITensor) -> None:
        self._outputs.append(tensor)


class ParserError(_Strict):
    _scope = "ParserError"

    def __init__(self, api, text: str):
        super().__init__(api)
        self._text = text

    def desc(self) -> str:
        return self._text

    def __str__(self) -> str:
        return f"In node -1 (parseGraph): {self._text}"


class OnnxParser(_Strict):
    _scope = "OnnxParser"

    def __init__(self, api, network: INetworkDefinition, logger):
        super().__init__(api)
        self._network, self._errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as error:  # noqa: BLE001 (any unreadable file is a parser error)
            self._errors.append(ParserError(self._api, f"INVALID_GRAPH: {type(error).__name__}: cannot read the model"))
            return False
        graph, api = model.graph, self._api
        initializers = {i.name for i in graph.initializer}

        def dims(value):
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)

        for value in graph.input:
            if value.name not in initializers:
                self._network._inputs.append(ITensor(api, value.name, dims(value)))
        shapes = {value.name: dims(value) for value in graph.output}
        tensors = {}
        for index, node in enumerate(graph.node):
            outputs = [ITensor(api, name, shapes.get(name, (-1, 1))) for name in node.output]
            tensors.update((t._name, t) for t in outputs)
            inputs = [name for name in node.input if name not in initializers]
            self._network._layers.append(ILayer(api, node.name or f"node{index}", node.op_type, inputs, outputs))
        for value in graph.output:
            self._network._outputs.append(tensors[value.name])
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]


class IOptimizationProfile(_Strict):
    _scope = "IOptimizationProfile"

    def __init__(self, api):
        super().__init__(api)
        self._shapes = {}

    def set_shape(self, input, min, opt, max):  # the real keyword names
        self._shapes[input] = {"min": list(min), "opt": list(opt), "max": list(max)}


class ITimingCache(_Strict):
    _scope = "ITimingCache"

    def __init__(self, api, data: bytes):
        super().__init__(api)
        self._loaded = bytes(data)

    def serialize(self) -> bytes:
        return self._loaded + b"timings;"  # what a build adds to the cache


def engine_record(path: str | Path) -> dict:
    """The request a test-double engine file records."""
    header, _, body = Path(path).read_bytes().partition(b"\n")
    assert header == ENGINE_HEADER, "not an engine written by the TensorRT test double"
    return json.loads(body)


def host_array(address: int, dtype, shape) -> np.ndarray:
    """A numpy view of memory the CUDA double handed out (tests/targets/cuda_double.py)."""
    count = int(np.prod(shape))
    raw = (ctypes.c_uint8 * (count * np.dtype(dtype).itemsize)).from_address(int(address))
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


# ------------------------------------------------------------------------------------------- the module


def make_tensorrt(api: str = "10.3", version: str | None = None, dla_cores: int = 2, hide=(),
                  fail_build: bool = False) -> types.ModuleType:
    """A `tensorrt`-shaped module offering exactly TensorRT `api`'s names ("10.3" or "11.1") less `hide`.

    `version` is what `trt.__version__` says (default: the API list's version).
    """
    names = Api(api, hide)
    trt = _Module("tensorrt")
    trt.api = names  # not a TensorRT name: the record of what the code asked for
    trt.__doc__ = "TEST DOUBLE of the tensorrt module (tests/targets/tensorrt_double.py)"
    trt.__version__ = version or f"{api}.0"
    trt.builds = []  # one record per build_serialized_network call (test-only, not a TensorRT name)
    names.names |= {"builds", "api"}
    for scope in ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "DeviceType", "TensorIOMode",
                  "ProfilingVerbosity", "LayerInformationFormat", "DataType"):
        setattr(trt, scope, _enum(names, scope))
    strongly_typed_only = "BuilderFlag.FP16" not in names.names

    def scoped(cls):
        cls._api = names
        return cls

    severity = _enum(names, "ILogger.Severity")
    levels = [severity[n] for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")]

    @scoped
    class ILogger(metaclass=_StrictClassMeta):
        _scope = "ILogger"
        Severity = severity
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = levels

        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    @scoped
    class Logger(ILogger):
        _scope = "Logger"
        Severity = severity
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = levels

        def __init__(self, min_severity=None):
            self.min_severity = min_severity

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.OnnxParser = lambda network, logger: OnnxParser(names, network, logger)
    if "IInt8EntropyCalibrator2" in names.names:
        class IInt8EntropyCalibrator2:  # subclassed by the code under test, as the real one is
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    class IBuilderConfig(_Strict):
        _scope = "IBuilderConfig"

        def __init__(self):
            super().__init__(names)
            self._flags, self._pools, self._profiles, self._timing = set(), {}, [], None
            self._calibration_profile = self._calibrator = None
            self._device, self._dla_core = trt.DeviceType.GPU, -1
            self._verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        default_device_type = property(lambda self: self._device, lambda self, v: object.__setattr__(self, "_device", v))
        DLA_core = property(lambda self: self._dla_core, lambda self, v: object.__setattr__(self, "_dla_core", int(v)))
        int8_calibrator = property(lambda self: self._calibrator,
                                   lambda self, v: object.__setattr__(self, "_calibrator", v))
        profiling_verbosity = property(lambda self: self._verbosity,
                                       lambda self, v: object.__setattr__(self, "_verbosity", v))

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
            return ITimingCache(names, serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            self._timing = (cache, bool(ignore_mismatch))
            return True

        def set_calibration_profile(self, profile):
            self._calibration_profile = profile
            return True

    class Builder(_Strict):
        _scope = "Builder"

        def __init__(self, logger):
            super().__init__(names)
            self._logger = logger

        num_DLA_cores = property(lambda self: dla_cores)

        def create_network(self, flags=0):
            return INetworkDefinition(names, flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile(names)

        def build_serialized_network(self, network, config):
            return _build(trt, self._logger, network, config, fail_build, strongly_typed_only)

    trt.Builder = Builder

    class EngineInspector(_Strict):
        _scope = "EngineInspector"

        def __init__(self, record):
            super().__init__(names)
            self._record, self._context = record, None

        execution_context = property(lambda self: self._context,
                                     lambda self, v: object.__setattr__(self, "_context", v))

        def get_engine_information(self, format):  # the real keyword name
            layers = self._record["layers"]
            if self._record["verbosity"] != "DETAILED":  # names only, as TensorRT documents
                layers = [layer["Name"] for layer in layers]
            if trt.LayerInformationFormat(format).name != "JSON":
                return "\n".join(str(layer) for layer in layers)
            return json.dumps({"Layers": layers, "Bindings": self._record["bindings"]})

    class IExecutionContext(_Strict):
        _scope = "IExecutionContext"

        def __init__(self, engine):
            super().__init__(names)
            self._engine, self._shape, self._addresses = engine, None, {}

        def set_input_shape(self, name, shape):
            profile = self._engine._record["profiles"][0][name]
            shape = tuple(int(d) for d in shape)
            fits = len(shape) == len(profile["min"]) and all(
                lo <= d <= hi for d, lo, hi in zip(shape, profile["min"], profile["max"], strict=True))
            if fits:
                self._shape = shape
            return fits

        def get_tensor_shape(self, name):
            if name == self._engine._input:
                return self._shape
            return (self._shape[0],) + tuple(self._engine._record["output_shapes"][name][1:])

        def set_tensor_address(self, name, memory):
            self._addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle):
            x = host_array(self._addresses[self._engine._input], np.float32, self._shape)
            for name in self._engine._outputs:
                shape = self.get_tensor_shape(name)
                out = host_array(self._addresses[name], np.float32, shape)
                out[...] = x.reshape(len(x), -1).mean(axis=1).reshape((-1,) + (1,) * (len(shape) - 1))
            return True

    class ICudaEngine(_Strict):
        _scope = "ICudaEngine"

        def __init__(self, record):
            super().__init__(names)
            self._record = record
            self._input = record["input"]
            self._outputs = record["outputs"]

        num_io_tensors = property(lambda self: 1 + len(self._outputs))
        num_layers = property(lambda self: len(self._record["layers"]))

        def get_tensor_name(self, index):
            return ([self._input] + self._outputs)[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == self._input else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile_index):
            shapes = self._record["profiles"][profile_index][name]
            return [tuple(shapes[k]) for k in ("min", "opt", "max")]

        def create_execution_context(self):
            return IExecutionContext(self)

        def create_engine_inspector(self):
            return EngineInspector(self._record)

    class Runtime(_Strict):
        _scope = "Runtime"

        def __init__(self, logger):
            super().__init__(names)
            self._dla_core = -1

        DLA_core = property(lambda self: self._dla_core, lambda self, v: object.__setattr__(self, "_dla_core", int(v)))

        def deserialize_cuda_engine(self, serialized_engine):
            header, _, body = bytes(serialized_engine).partition(b"\n")
            return ICudaEngine(json.loads(body)) if header == ENGINE_HEADER else None

    trt.Runtime = Runtime
    trt.nptype = lambda dtype: {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8,
                                "INT32": np.int32}[trt.DataType(dtype).name]
    return trt


def _build(trt, logger, network, config, fail_build: bool, strongly_typed_only: bool):
    """Record the request; refuse what TensorRT refuses here; lay out a plausible engine."""
    calibrator = config._calibrator
    cache = calibrator.read_calibration_cache().decode() if calibrator is not None else None
    dla = trt.DeviceType(config._device).name == "DLA"
    flags = sorted(f.name for f in config._flags)
    record = {
        "network_flags": [f.name for f in trt.NetworkDefinitionCreationFlag if network._flags & (1 << int(f))],
        "builder_flags": flags,
        "workspace": config._pools.get(trt.MemoryPoolType.WORKSPACE),
        "profiles": [p._shapes for p in config._profiles],
        "calibration_profile": config._calibration_profile._shapes if config._calibration_profile else None,
        "device": trt.DeviceType(config._device).name,
        "dla_core": config._dla_core,
        "timing_cache_loaded": config._timing[0]._loaded.decode("latin-1") if config._timing else None,
        "timing_cache_ignore_mismatch": config._timing[1] if config._timing else None,
        "calibration_cache": cache,
        "outputs": [t._name for t in network._outputs],
        "verbosity": trt.ProfilingVerbosity(config._verbosity).name,
    }
    trt.builds.append(record)
    dynamic = [name for p in config._profiles for name, s in p._shapes.items() if not s["min"] == s["opt"] == s["max"]]
    if fail_build or (dla and dynamic):
        why = ("test double: build refused on purpose" if fail_build else
               f"DLA does not support dynamic shapes ({dynamic[0]}: min, opt and max must be equal)")
        logger.log(trt.ILogger.Severity.ERROR, why)
        return None
    scales = {}
    if cache:
        for line in cache.splitlines()[1:]:
            name, _, value = line.rpartition(": ")
            scales[name] = value
    record["layers"] = _layout(network, dla, "INT8" in flags, "FP16" in flags, scales)
    record["input"] = network._inputs[0]._name
    record["bindings"] = [record["input"]] + record["outputs"]
    record["output_shapes"] = {t._name: list(t._shape) for t in network._outputs}
    return ENGINE_HEADER + b"\n" + json.dumps(record).encode()


def _layout(network, dla: bool, int8: bool, fp16: bool, scales: dict) -> list[dict]:
    """Engine layers in the engine inspector's documented JSON form (detailed verbosity).

    On DLA, layers of DLA_OPS run there (consecutive ones of one precision as one `{ForeignNode[a...b]}`
    layer of type "DLA"), the rest on the GPU behind a reformat. With a calibration cache a layer runs
    in INT8 only when its output has a scale (as implicit INT8 does), else FP16.
    """
    def precision(layer) -> str:
        if int8 and (not scales or all(t._name in scales for t in layer._outputs)):
            return "Thirty-two wide channel vectorized row major Int8 format"
        return "Channel major FP16 format where channel % 16 == 0" if fp16 or int8 else "Row major linear FP32"

    def tensor(name, kind):
        return {"Name": name, "Location": "Device", "Dimensions": [1, 8, 32, 32], "Format/Datatype": kind}

    out, group = [], []

    def close_group():
        if group:
            first, last, kind = group[0]._name, group[-1]._name, precision(group[0])
            covered = f"{first}...{last}" if len(group) > 1 else first
            out.append({"Name": "{ForeignNode[" + covered + "]}", "LayerType": "DLA",
                        "Inputs": [tensor(n, kind) for n in group[0]._inputs],
                        "Outputs": [tensor(t._name, kind) for t in group[-1]._outputs], "TacticValue": "0x3"})
            group.clear()

    for layer in network._layers:
        if layer._op in ("QuantizeLinear", "DequantizeLinear", "Flatten", "Constant"):
            continue  # fused or folded away, as TensorRT does
        if dla and layer._op in DLA_OPS:
            if group and precision(group[-1]) != precision(layer):
                close_group()
            group.append(layer)
            continue
        if group:
            close_group()
            out.append({"Name": f"Reformatting CopyNode for Input Tensor 0 to {layer._name}", "LayerType": "Reformat",
                        "Inputs": [], "Outputs": []})
        kind = precision(layer)
        out.append({"Name": layer._name, "LayerType": "CaskConvolution" if layer._op == "Conv" else layer._op,
                    "Inputs": [tensor(n, kind) for n in layer._inputs],
                    "Outputs": [tensor(t._name, kind) for t in layer._outputs], "TacticName": "double"})
    close_group()
    return out
