"""Typed build configuration read from `pipeline.yaml`.

The packaged `pipeline.yaml` holds every default; a user's file is merged over it key by key.
Unknown keys, wrong types and bad YAML each give one PipelineError naming the file, line and key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from pipeline.drift import DriftBudget
from pipeline.errors import PipelineError
from pipeline.executor import KINDS as EXECUTORS  # the one list of executors
from calibration import METHODS as CALIBRATION_METHODS
from targets import GPU_TARGETS, TARGETS  # noqa: F401  (GPU_TARGETS re-exported for the host side)
from targets.openvino import AUTO, INFERENCE_PRECISIONS

# quantization.overflow_fix (pipeline/stages/quantize/overflow.py): auto decides by this machine's CPU.
OVERFLOW_FIX_CHOICES = ("auto", "enable", "disable")

PRECISIONS = ("int8", "fp32", "fp16")
OPENVINO_PRECISIONS = (AUTO, *INFERENCE_PRECISIONS)
# `evaluation_images: all`: every image the layout lists (ImageNet's 50,000), as a count larger than any layout.
ALL_IMAGES = 2**31 - 1
ALL_ALLOWED = ("data.evaluation_images", "quantization.evaluation_images")
GATE_BUDGET = "gate"  # drift.gate: what the INT8 gate asks of both back ends beyond their stage budgets


@dataclass(frozen=True)
class NetworkOptions:
    num_classes: int = 0
    input_size: int = 0
    labels: str = ""
    residual_scales: tuple[float, ...] = ()


INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class PreprocessingOptions:
    """pipeline.yaml's `preprocessing:`: each key set overrides the network's own (0 / "" / []: unset).
    How they combine into a build's preprocessing: `pipeline.models.preprocessing`."""

    crop: int = 0
    crop_pct: float = 0.0
    resize: int = 0  # the shorter side before the crop, instead of crop_pct
    interpolation: str = ""
    mean: tuple[float, ...] = ()  # in the order of `channels`, in the units of `scale`
    std: tuple[float, ...] = ()
    channels: str = ""  # RGB | BGR: the channel order your network takes
    layout: str = ""  # NCHW | NHWC: your network's input layout ("": an ONNX file's own, else NCHW)
    scale: int = 0  # 1: pixels in 0..1 before mean/std; 255: in 0..255

    def __post_init__(self):
        choices = {"interpolation": INTERPOLATIONS, "channels": ("RGB", "BGR"), "layout": ("NCHW", "NHWC")}
        for key, allowed in choices.items():
            if getattr(self, key) and getattr(self, key) not in allowed:
                raise PipelineError(f"'{key}' must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        if self.scale not in (0, 1, 255):
            raise PipelineError(f"'scale' must be 1 (pixels in 0..1) or 255 (0..255), not {self.scale}")
        if self.crop < 0 or self.resize < 0 or not 0.0 <= self.crop_pct <= 1.0:
            raise PipelineError("crop and resize must be positive, crop_pct in (0, 1]")
        if self.crop_pct and self.resize:
            raise PipelineError("give crop_pct or resize, not both")
        for key in ("mean", "std"):
            if getattr(self, key) and len(getattr(self, key)) != 3:
                raise PipelineError(f"'{key}' needs 3 numbers (one per channel), not {list(getattr(self, key))}")
        if any(value == 0 for value in self.std):
            raise PipelineError(f"'std' must not contain 0, got {list(self.std)}")


@dataclass(frozen=True)
class DataOptions:
    imagenet: str = "../shared/imagenet"
    frames: str = ""
    calibration_images: int = 512
    batchnorm_images: int = 64
    evaluation_images: int = 64
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class QuantizationOptions:
    method: str = "percentile"
    percentile: float = 99.99
    histogram_bins: int = 2048
    evaluation_images: int = 650
    residual_adds: bool = False  # residual Adds read both inputs through Q/DQ (TensorRT's fusable placement)
    int8_head: bool = False  # the global pool's input and the Gemm / MatMul head in INT8 too (NNCF's placement)
    bias_correction: bool = True  # each INT8 Conv's bias corrected by its weight rounding's mean output shift
    adaround: bool = False  # INT8 weights rounded up or down by per-layer output reconstruction (AdaRound)
    equalization: bool = False  # cross-layer equalization of the FP32 graph before calibration (exact pairs only)
    unsigned_activations: bool = True  # CPU target: never-negative activations in UINT8 (TensorRT: INT8 only)
    overflow_fix: str = "auto"  # CPU target: INT8 that cannot saturate on x86 without VNNI (auto: if this CPU would)
    decision_images: int = 480  # labelled train-sample/ images the gate decides on (never calibration images)
    sensitivity_images: int = 16
    max_fallback_layers: int = 24
    fallback_group: int = 2


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17


@dataclass(frozen=True)
class OpenVinoOptions:
    threads: int = 0
    inference_precision: str = "auto"


@dataclass(frozen=True)
class TensorRtOptions:
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mib: int = 2048
    dla_core: int = -1  # -1: GPU only; 0/1: that DLA core with GPU fallback (Jetson Orin)
    dla_batch: int = 1  # DLA engines have static shapes: one engine per batch size
    min_dla_layers: float = 0.0  # fraction of the layers that must run on DLA, else the engine build fails
    timing_cache: str = "tensorrt-timing.cache"  # relative paths lie beside the device's engines


@dataclass(frozen=True)
class ExecutorOptions:
    """Where evaluations run (`pipeline.executor`): this process, or shards on a Ray cluster."""

    kind: str = "local"  # local | ray
    address: str = ""  # ray: "" starts Ray on this machine; "auto" or "ray://host:10001" joins a cluster
    shard_images: int = 64  # images per Ray task (rounded up to whole batches)
    worker_cpus: int = 1  # CPUs (and back-end threads) of each Ray task


@dataclass(frozen=True)
class BundleOptions:
    golden_images: int = 256
    include_wheel: bool = True


@dataclass(frozen=True)
class Config:
    build_dir: str
    models: tuple[str, ...]
    target: str
    precision: str
    weights: str
    network: NetworkOptions
    data: DataOptions
    export: ExportOptions
    quantization: QuantizationOptions
    openvino: OpenVinoOptions
    drift: dict[str, DriftBudget]
    tensorrt: TensorRtOptions = field(default_factory=TensorRtOptions)
    bundle: BundleOptions = field(default_factory=BundleOptions)
    preprocessing: PreprocessingOptions = field(default_factory=PreprocessingOptions)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    random_weights_drift: dict[str, DriftBudget] = field(default_factory=dict)
    unlabelled_drift: dict[str, DriftBudget] = field(default_factory=dict)

    def budget(self, stage: str, random_weights: bool, labelled: bool = True) -> DriftBudget:
        """A stage's budget. Random weights and unlabelled images swap in their own thresholds for
        the figures that mean nothing there (agreement; accuracy), see pipeline.yaml."""
        budget = self.drift.get(stage, DriftBudget())
        if not labelled and stage in self.unlabelled_drift:
            budget = _override(budget, self.unlabelled_drift[stage], max_top1_drop=None)
        if random_weights and stage in self.random_weights_drift:
            budget = _override(budget, self.random_weights_drift[stage], min_agreement=None, max_top1_drop=None)
        return budget

    def gate_budget(self, stage: str, random_weights: bool, labelled: bool = True) -> DriftBudget:
        """What the INT8 gate asks of `stage` (quantize, openvino_int8) on its decision images: the stage's
        budget, tightened by `drift.gate` (e.g. min_agreement: 0.99) where that sets a figure."""
        budget = self.budget(stage, random_weights, labelled)
        extra = self.drift.get(GATE_BUDGET)
        if extra is None:
            return budget
        # Figures that mean nothing here are dropped, as `budget` drops them from the stage budgets.
        meaningless = ("min_agreement", "max_top1_drop") if random_weights else () if labelled else ("max_top1_drop",)
        return _override(budget, dataclasses.replace(extra, **dict.fromkeys(meaningless)))


def _override(budget: DriftBudget, override: DriftBudget, **cleared) -> DriftBudget:
    changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
    return dataclasses.replace(budget, **{**cleared, **changes})


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of each key, for error messages."""


class _Mapping(dict):
    lines: dict[str, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping()
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:  # PyYAML keeps the last silently: one of the two values would be ignored
            raise yaml.constructor.ConstructorError(
                problem=f"{key!r} is given twice (also on line {mapping.lines[key]}); keep one",
                problem_mark=key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read the configuration ({error.strerror})") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PipelineError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return _Mapping()
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: the configuration must be a mapping of keys, not {type(data).__name__}")
    return data


def _where(source: Path, mapping: dict, key: str) -> str:
    line = getattr(mapping, "lines", {}).get(key)
    return f"{source}:{line}" if line else str(source)


def _convert(value: Any, kind: Any, name: str, where: str) -> Any:
    """Check one value against a field's annotation (int, float, str, tuple[...], budget)."""
    if value == "all" and name in ALL_ALLOWED:
        return ALL_IMAGES
    origin = get_origin(kind)
    if origin is tuple:
        items = value if isinstance(value, list) else None
        if items is None:
            raise PipelineError(f"{where}: '{name}' must be a list, not {value!r}")
        return tuple(_convert(item, get_args(kind)[0], name, where) for item in items)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise PipelineError(f"{where}: '{name}' must be {kind.__name__}, not {value!r}")
    return value


def _build_dataclass(cls: type, mapping: dict, prefix: str, source: Path) -> Any:
    if not isinstance(mapping, dict):
        raise PipelineError(f"{source}: '{prefix.rstrip('.')}' must be a mapping of keys")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in mapping.items():
        where = _where(source, mapping, key)
        if key not in known:
            raise PipelineError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})")
        values[key] = _convert(value, hints[key], prefix + key, where)
    try:
        return cls(**values)
    except PipelineError as error:  # a value check inside the dataclass: say where it came from
        raise PipelineError(f"{source}: '{prefix.rstrip('.')}': {error}") from None


def _budgets(mapping: Any, prefix: str, source: Path) -> dict[str, DriftBudget]:
    if not isinstance(mapping, dict):
        raise PipelineError(f"{source}: '{prefix}' must be a mapping of stage names to budgets")
    return {
        stage: _build_dataclass(DriftBudget, budget or {}, f"{prefix}.{stage}.", source)
        for stage, budget in mapping.items()
    }


def _merge(base: dict, override: dict) -> dict:
    merged = _Mapping(base)
    merged.lines = {**getattr(base, "lines", {}), **getattr(override, "lines", {})}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = _merge(base[key], value)
        merged[key] = value
    return merged


def default_config_path() -> Path:
    return Path(str(resources.files("pipeline") / "pipeline.yaml"))


def load_config(path: Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults from the packaged pipeline.yaml, then the user's file, then command-line overrides."""
    source = default_config_path()
    data = read_yaml(source)
    if path is not None:
        source = Path(path)
        data = _merge(data, read_yaml(source))
    if overrides:
        data = _merge(data, overrides)
    top = {f.name for f in dataclasses.fields(Config)} - {"random_weights_drift", "unlabelled_drift"}
    for key in data:
        if key not in top:
            raise PipelineError(f"{_where(source, data, key)}: unknown key '{key}' (known: {', '.join(sorted(top))})")
    drift = dict(data.get("drift") or {})
    random_drift = drift.pop("random_weights", {}) or {}
    unlabelled_drift = drift.pop("unlabelled", {}) or {}
    models = data.get("models")
    if isinstance(models, str):
        models = [models]
    config = Config(
        build_dir=_convert(data.get("build_dir"), str, "build_dir", _where(source, data, "build_dir")),
        models=_convert(models, tuple[str, ...], "models", _where(source, data, "models")),
        target=_convert(data.get("target"), str, "target", _where(source, data, "target")),
        precision=_convert(data.get("precision"), str, "precision", _where(source, data, "precision")),
        weights=_convert(data.get("weights"), str, "weights", _where(source, data, "weights")),
        network=_build_dataclass(NetworkOptions, data.get("network") or {}, "network.", source),
        data=_build_dataclass(DataOptions, data.get("data") or {}, "data.", source),
        export=_build_dataclass(ExportOptions, data.get("export") or {}, "export.", source),
        quantization=_build_dataclass(QuantizationOptions, data.get("quantization") or {}, "quantization.", source),
        openvino=_build_dataclass(OpenVinoOptions, data.get("openvino") or {}, "openvino.", source),
        tensorrt=_build_dataclass(TensorRtOptions, data.get("tensorrt") or {}, "tensorrt.", source),
        bundle=_build_dataclass(BundleOptions, data.get("bundle") or {}, "bundle.", source),
        preprocessing=_build_dataclass(PreprocessingOptions, data.get("preprocessing") or {}, "preprocessing.", source),
        executor=_build_dataclass(ExecutorOptions, data.get("executor") or {}, "executor.", source),
        drift=_budgets(drift, "drift", source),
        random_weights_drift=_budgets(random_drift, "drift.random_weights", source),
        unlabelled_drift=_budgets(unlabelled_drift, "drift.unlabelled", source),
    )
    _check_choices(config, source, data)
    return config


def _check_choices(config: Config, source: Path, data: dict) -> None:
    def choose(name: str, value: str, choices: tuple[str, ...], where: str) -> None:
        if value not in choices:
            raise PipelineError(f"{where}: '{name}' must be one of {', '.join(choices)}, not '{value}'")

    choose("target", config.target, TARGETS, _where(source, data, "target"))
    choose("precision", config.precision, PRECISIONS, _where(source, data, "precision"))
    choose("openvino.inference_precision", config.openvino.inference_precision, OPENVINO_PRECISIONS, str(source))
    choose("quantization.method", config.quantization.method, CALIBRATION_METHODS, str(source))
    choose("quantization.overflow_fix", config.quantization.overflow_fix, OVERFLOW_FIX_CHOICES, str(source))
    choose("executor.kind", config.executor.kind, EXECUTORS, str(source))
    positive = {
        "data.calibration_images": config.data.calibration_images,
        "data.batchnorm_images": config.data.batchnorm_images,
        "data.evaluation_images": config.data.evaluation_images,
        "data.batch_size": config.data.batch_size,
        "quantization.evaluation_images": config.quantization.evaluation_images,
        "quantization.sensitivity_images": config.quantization.sensitivity_images,
        "quantization.decision_images": config.quantization.decision_images,
        "quantization.histogram_bins": config.quantization.histogram_bins,
        "quantization.fallback_group": config.quantization.fallback_group,
        "tensorrt.min_batch": config.tensorrt.min_batch,
        "tensorrt.workspace_mib": config.tensorrt.workspace_mib,
        "tensorrt.dla_batch": config.tensorrt.dla_batch,
        "bundle.golden_images": config.bundle.golden_images,
        "executor.shard_images": config.executor.shard_images,
        "executor.worker_cpus": config.executor.worker_cpus,
    }
    for name, value in positive.items():
        if value < 1:
            raise PipelineError(f"{source}: '{name}' must be at least 1, not {value}")
    if not 50.0 < config.quantization.percentile <= 100.0:
        raise PipelineError(f"{source}: 'quantization.percentile' must lie in (50, 100], not {config.quantization.percentile}")
    trt = config.tensorrt
    if not trt.min_batch <= trt.opt_batch <= trt.max_batch:
        raise PipelineError(f"{source}: 'tensorrt' batch sizes must satisfy min_batch <= opt_batch <= max_batch, "
                            f"not {trt.min_batch}, {trt.opt_batch}, {trt.max_batch}")
    if trt.dla_core < -1:
        raise PipelineError(f"{source}: 'tensorrt.dla_core' must be -1 (GPU only) or a DLA core number")
    if not 0.0 <= trt.min_dla_layers <= 1.0:
        raise PipelineError(f"{source}: 'tensorrt.min_dla_layers' is a fraction in [0, 1], not {trt.min_dla_layers}")
    if config.quantization.max_fallback_layers < 0:
        raise PipelineError(f"{source}: 'quantization.max_fallback_layers' must be 0 or more")
    for name in ("num_classes", "input_size"):
        if getattr(config.network, name) < 0:
            raise PipelineError(f"{source}: 'network.{name}' must be 0 (automatic) or positive")
    if config.network.residual_scales and len(config.network.residual_scales) != 3:
        raise PipelineError(f"{source}: 'network.residual_scales' needs three scales (35x35, 17x17, 8x8 blocks)")
