"""One TensorRT engine builder for TensorRT 10.x and 11.x, deciding by the module's features.

Which ONNX and which builder settings (the `BuildPlan`) follow from the precision asked for and from
what the installed `tensorrt` module offers, never from its version string:

| request | TensorRT 10.x (INT8/FP16 flags, calibrators) | strongly typed only (11.x) |
| --- | --- | --- |
| int8, GPU | int8_qdq.onnx + FP16 + INT8 flags (explicit quantization) | int8_qdq_fp16.onnx, strongly typed |
| int8, DLA | fp32.onnx + INT8 + FP16 + GPU_FALLBACK, legacy calibration cache (implicit INT8, as DLA takes it on JetPack 6) | int8_qdq_fp16.onnx strongly typed + GPU_FALLBACK (check the release notes) |
| fp16 | fp32.onnx + FP16 flag | fp16.onnx, strongly typed |
| fp32 | fp32.onnx | fp32.onnx, strongly typed |

A strongly typed build runs every layer in the type its ONNX gives it, which is why TensorRT 11 takes
the FP16-typed Q/DQ model (the FP32-typed one would run its float layers in FP32). The bundle's FP16
ONNX comes from onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`: its inputs and
outputs stay float32, so every engine takes and returns float32.

`build_engine` then parses the ONNX, sets an optimization profile over the batch axis (static,
min = opt = max at `dla_batch`, for DLA: it supports no dynamic dimensions), the workspace limit, the
persistent timing cache, DLA and detailed profiling verbosity, reads back where the layers landed
(`placement.py`; `min_dla_layers` can fail the build), and writes `model.engine` and
`model.engine.json` side by side (the metadata last: it marks the engine complete).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from targets.tensorrt.hooks import (
    attach_timing_cache,
    cache_calibrator,
    collecting_logger,
    write_atomic,
)
from targets.tensorrt.metadata import EngineMetadata, metadata_path
from targets.tensorrt.placement import check_dla_budget, read_placement

PRECISIONS = ("int8", "fp16", "fp32")
MODEL_KEYS = ("fp32", "fp16", "int8_qdq", "int8_qdq_fp16", "int8_qdq_fallback")


@dataclass(frozen=True)
class Features:
    version: str
    strongly_typed_only: bool  # no FP16/INT8 builder flags: every network is strongly typed (11.x)
    has_int8_flag: bool
    has_fp16_flag: bool
    has_calibrator: bool  # IInt8EntropyCalibrator2: implicit INT8 from a calibration cache


def detect_features(trt) -> Features:
    has_int8 = hasattr(trt.BuilderFlag, "INT8")
    has_fp16 = hasattr(trt.BuilderFlag, "FP16")
    return Features(
        version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed_only=not (has_int8 or has_fp16),
        has_int8_flag=has_int8,
        has_fp16_flag=has_fp16,
        has_calibrator=hasattr(trt, "IInt8EntropyCalibrator2"),
    )


@dataclass(frozen=True)
class EngineOptions:
    precision: str  # "int8" | "fp16" | "fp32"
    image_size: int
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    input_name: str = "input"
    workspace_mib: int = 2048
    dla_core: int = -1  # -1: GPU only; 0/1: that DLA core with GPU fallback (Jetson Orin)
    dla_batch: int = 1  # DLA takes static shapes only: its engine is built for this one batch size
    min_dla_layers: float = 0.0  # fraction of the layers that must land on DLA, else the build fails
    timing_cache: Path | None = None
    mark_outputs: tuple[str, ...] = ()  # intermediate tensors to return too (finding where drift starts)

    @property
    def static(self) -> bool:
        """DLA supports no dynamic dimensions (min = opt = max): a DLA engine has one batch size."""
        return self.dla_core >= 0

    @property
    def batches(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the optimization profile."""
        return (self.dla_batch,) * 3 if self.static else (self.min_batch, self.opt_batch, self.max_batch)

    def shapes(self, channels: int = 3) -> dict[str, list[int]]:
        size = self.image_size
        return {key: [batch, channels, size, size] for key, batch in zip(("min", "opt", "max"), self.batches, strict=True)}

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise PipelineError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise PipelineError(f"tensorrt batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, "
                                f"not {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if self.image_size < 1 or self.workspace_mib < 1 or self.dla_batch < 1:
            raise PipelineError(f"image_size, tensorrt.workspace_mib and tensorrt.dla_batch must be positive "
                                f"(got {self.image_size}, {self.workspace_mib}, {self.dla_batch})")
        if self.dla_core < -1:
            raise PipelineError(f"tensorrt.dla_core must be -1 (GPU only) or a DLA core number, not {self.dla_core}")
        if not 0.0 <= self.min_dla_layers <= 1.0:
            raise PipelineError(f"tensorrt.min_dla_layers is a fraction in [0, 1], not {self.min_dla_layers}")


@dataclass(frozen=True)
class BuildPlan:
    onnx: Path
    strongly_typed: bool
    flags: tuple[str, ...]  # names of trt.BuilderFlag members to set
    calibration_cache: Path | None  # legacy cache the build reads (implicit INT8), else None
    note: str  # why this ONNX and these flags, for the user and the metadata


def needs_calibration_cache(features: Features, options: EngineOptions) -> bool:
    """True where the build takes INT8 from a legacy calibration cache (DLA on a TensorRT with calibrators)."""
    return (options.precision == "int8" and options.dla_core >= 0 and features.has_calibrator
            and features.has_int8_flag and not features.strongly_typed_only)


def plan_build(
    features: Features,
    options: EngineOptions,
    models: dict[str, Path],
    calibration_cache: Path | None = None,
) -> BuildPlan:
    """Which ONNX of the bundle (`models`: any of MODEL_KEYS -> path) and which settings to build with."""
    options.check()
    unknown = sorted(set(models) - set(MODEL_KEYS))
    if unknown:
        raise PipelineError(f"unknown model keys {unknown} (known: {', '.join(MODEL_KEYS)})")
    trt = f"TensorRT {features.version}"
    dla = options.dla_core >= 0
    fallback = ("GPU_FALLBACK",) if dla else ()

    def model(key: str, why: str) -> Path:
        if key not in models:
            raise PipelineError(f"{options.precision} on {trt} needs the bundle's {key} model ({why}), "
                                f"the bundle has: {', '.join(sorted(models)) or 'none'}: rebuild the bundle")
        return Path(models[key])

    if dla and options.precision == "fp32":
        raise PipelineError("DLA runs FP16 and INT8 only: use --precision fp16 or int8, or --dla-core -1 (GPU)")

    if options.precision == "int8":
        if dla and needs_calibration_cache(features, options):
            if calibration_cache is None:
                raise PipelineError(f"INT8 on DLA with {trt} needs the legacy calibration cache: write it from the "
                                    "bundle's calibration.json (calibration_cache.write_legacy_cache)")
            return BuildPlan(model("fp32", "implicit INT8 for DLA"), False, ("INT8", "FP16") + fallback,
                             Path(calibration_cache),
                             f"DLA core {options.dla_core}: implicit INT8 from the legacy calibration cache on the "
                             "FP32 ONNX, FP16 where INT8 does not apply, GPU fallback (deprecated since 10.1; "
                             "what DLA takes on JetPack 6)")
        if features.strongly_typed_only:
            note = "strongly typed INT8 from the FP16-typed Q/DQ ONNX (explicit quantization)"
            if dla:
                note += (f"; DLA core {options.dla_core} with GPU fallback takes strongly typed networks only on "
                         "some releases: check this TensorRT's release notes")
            return BuildPlan(model("int8_qdq_fp16", "strongly typed INT8"), True, fallback, None, note)
        if not features.has_fp16_flag:
            raise PipelineError(f"{trt} has neither strongly typed-only builds nor the FP16 flag: unsupported")
        if dla and not features.has_int8_flag:
            raise PipelineError(f"INT8 on DLA with {trt} needs a calibrator or the INT8 flag, it has neither: "
                                "use --dla-core -1 (GPU) or --precision fp16")
        flags = ("FP16", "INT8") if features.has_int8_flag else ("FP16",)
        return BuildPlan(model("int8_qdq", "explicit INT8 from Q/DQ"), False, flags + fallback, None,
                         "explicit INT8 from the Q/DQ ONNX, FP16 for the layers left in float"
                         + (f"; DLA core {options.dla_core} with GPU fallback" if dla else ""))

    if options.precision == "fp16":
        if features.strongly_typed_only:
            return BuildPlan(model("fp16", "strongly typed FP16"), True, fallback, None,
                             "strongly typed FP16 from the FP16 ONNX (float32 inputs and outputs)")
        return BuildPlan(model("fp32", "FP16 by builder flag"), False, ("FP16",) + fallback, None,
                         "FP32 ONNX with the FP16 builder flag" + (f"; DLA core {options.dla_core}" if dla else ""))

    return BuildPlan(model("fp32", "FP32 engine"), features.strongly_typed_only, (), None,
                     "FP32 ONNX" + (", strongly typed" if features.strongly_typed_only else ""))


def model_files(manifest: dict) -> dict[str, str]:
    """Bundle-relative ONNX files by MODEL_KEYS, from a bundle manifest's `artifacts`."""
    artifacts = manifest.get("artifacts") or {}

    def file_of(entry) -> str | None:
        if isinstance(entry, str):
            return entry
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            return entry["file"]
        return None

    found: dict[str, str] = {}
    for precision, key in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8_qdq")):
        entry = artifacts.get(precision)
        if isinstance(entry, dict) and entry.get("kind", "onnx") == "onnx" and file_of(entry):
            found[key] = file_of(entry)
    int8 = artifacts.get("int8")
    if isinstance(int8, dict):
        for field, key in (("strongly_typed", "int8_qdq_fp16"), ("fallback", "int8_qdq_fallback")):
            if file_of(int8.get(field)):
                found[key] = file_of(int8.get(field))
    for key in MODEL_KEYS:  # the documented layout, for manifests that list files only
        if key not in found and f"models/{key}.onnx" in (manifest.get("files") or {}):
            found[key] = f"models/{key}.onnx"
    return found


def build_engine(
    plan: BuildPlan,
    options: EngineOptions,
    engine_path: Path,
    metadata_extra: dict | None = None,
    trt=None,
    device: dict | None = None,
) -> EngineMetadata:
    """Build the engine of `plan` and write `engine_path` + its metadata (`.json` beside it) atomically.

    `device`: {"name", "compute_capability", "l4t_release"} of the GPU (default: read with cuda-python).
    """
    from pipeline import __version__
    from pipeline.artifact import sha256_file

    options.check()
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            from targets.tensorrt.device_info import NO_TENSORRT

            raise PipelineError(NO_TENSORRT) from None
    if device is None:
        device = _this_device()
    if not Path(plan.onnx).is_file():
        raise PipelineError(f"{plan.onnx}: ONNX model not found: copy the whole bundle again")
    engine_path = Path(engine_path)
    try:
        serialized, shapes, marked, layers = _serialize(trt, plan, options)
    except PipelineError:
        raise
    except Exception as error:  # the bindings raise RuntimeError/TypeError with TensorRT's text
        lines = str(error).strip().splitlines()
        raise PipelineError(f"TensorRT {trt.__version__} failed to build an engine from {plan.onnx}: "
                            f"{type(error).__name__}: {lines[0] if lines else ''}") from error
    # What TensorRT really built, not what was asked for: DLA falls back to the GPU without an error.
    placement = read_placement(trt, serialized, layers, options.dla_core)
    check_dla_budget(placement, options.dla_core, options.min_dla_layers, engine_path)

    metadata = EngineMetadata(
        tensorrt_version=str(trt.__version__),
        gpu_name=device["name"],
        compute_capability=str(device["compute_capability"]),
        l4t_release=device.get("l4t_release"),
        precision=options.precision,
        strongly_typed=plan.strongly_typed,
        input_name=options.input_name,
        input_shapes=shapes,
        source_onnx=Path(plan.onnx).name,
        source_onnx_sha256=sha256_file(Path(plan.onnx)),
        dla_core=options.dla_core,
        static_shapes=options.static,
        placement=placement,
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        pipeline_version=__version__,
        extra={"flags": list(plan.flags), "note": plan.note, "marked_outputs": marked,
               "calibration_cache": Path(plan.calibration_cache).name if plan.calibration_cache else None,
               "workspace_mib": options.workspace_mib, **(metadata_extra or {})},
    )
    # Old metadata goes first: an engine without metadata is never taken for a complete one.
    metadata_path(engine_path).unlink(missing_ok=True)
    write_atomic(engine_path, serialized)
    metadata.save(metadata_path(engine_path))
    return metadata


def _serialize(trt, plan: BuildPlan, options: EngineOptions):
    """Parse, configure and build: (serialized engine, profile shapes, marked outputs, network layer names);
    writes only the timing cache."""
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        raise PipelineError(f"TensorRT {trt.__version__} cannot parse {plan.onnx}: " + "; ".join(errors or logger.errors))
    channels = _check_input(network, options, plan)
    marked = _mark_outputs(network, options.mark_outputs, plan)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the engine inspector then names placement
    for flag in plan.flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise PipelineError(f"TensorRT {trt.__version__} has no builder flag {flag}: plan the build with "
                                "detect_features() of this TensorRT")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    shapes = options.shapes(channels)
    profile = builder.create_optimization_profile()
    profile.set_shape(options.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if options.dla_core >= 0:
        cores = builder.num_DLA_cores
        if options.dla_core >= cores:
            raise PipelineError(f"DLA core {options.dla_core} asked for, this device has {cores} DLA cores: "
                                "use --dla-core -1 (GPU)" + (f" or 0..{cores - 1}" if cores else ""))
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
    calibrator = None  # referenced here until the build ends: TensorRT calls back into it
    if plan.calibration_cache is not None:
        calibrator = cache_calibrator(trt, Path(plan.calibration_cache))
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)  # the branch runs on 10.x only, which has it
    timing_cache = attach_timing_cache(config, options.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "see TensorRT's messages above"
        raise PipelineError(f"TensorRT {trt.__version__} could not build an engine from {plan.onnx}: {detail}")
    if options.timing_cache is not None:
        write_atomic(Path(options.timing_cache), bytes(timing_cache.serialize()))
    layers = [network.get_layer(i).name for i in range(network.num_layers)]
    return bytes(serialized), shapes, marked, layers


def _this_device() -> dict:
    from targets.tensorrt.device_info import gpu_description, l4t_release_here

    return {**gpu_description(), "l4t_release": l4t_release_here()}


def _network_flags(trt, plan: BuildPlan) -> int:
    # Strongly typed plans come only from a strongly typed-only TensorRT (11.x): every network is strongly
    # typed there and NetworkDefinitionCreationFlag.STRONGLY_TYPED is a deprecated no-op, so no flag is set.
    return 0


def _check_input(network, options: EngineOptions, plan: BuildPlan) -> int:
    """The input's channel count; PipelineError when the ONNX has no input of that name."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        if tensor.name == options.input_name:
            shape = list(tensor.shape)
            return shape[1] if len(shape) == 4 and shape[1] > 0 else 3
    raise PipelineError(f"{plan.onnx} has no input named {options.input_name!r} "
                        f"(it has {[t.name for t in inputs]}): check the bundle manifest's input name")


def _mark_outputs(network, names: tuple[str, ...], plan: BuildPlan) -> list[str]:
    if not names:
        return []
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    tensors = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            tensors[tensor.name] = tensor
    missing = [name for name in names if name not in tensors]
    if missing:
        raise PipelineError(f"{plan.onnx} has no tensors named {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                            "the intermediate tensors must be those of the ONNX the engine is built from")
    marked = []
    for name in names:
        if name not in outputs:
            network.mark_output(tensors[name])
            marked.append(name)
    return marked
