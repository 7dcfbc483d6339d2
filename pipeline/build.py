"""Runs a model's stage graph: cache lookups, building, a drift check after every stage, the manifest."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import platform
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.cache import ArtifactCache, StageRecord, sha256_file, stable_hash, write_json_atomic
from pipeline.config import GPU_TARGETS, Config
from pipeline.drift import DriftResult, compare
from pipeline.errors import DriftError, PipelineError
from pipeline.progress import Reporter
from pipeline.stages import LABELS_FILE, LOGITS_FILE, Stage, deployed_stage, stages_for


def tool_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _module_file(name: str) -> str:
    """A module's source file, found without importing it (importing may pull in torch)."""
    return importlib.util.find_spec(name).origin


def _code_hash(stage: Stage, extra_modules: tuple[str, ...] = ()) -> str:
    """Hash of the source files that implement a stage: editing them invalidates its cache."""
    files = {inspect.getsourcefile(stage.produce)}
    files.update(_module_file(name) for name in stage.modules + extra_modules)
    return stable_hash(sorted(sha256_file(Path(f)) for f in files))


@dataclass(frozen=True)
class ImageSet:
    """Center-cropped uint8 images (N, H, W, 3), labels (-1 where unknown), the digest of the files."""

    crops: np.ndarray
    labels: np.ndarray
    digest: str
    paths: tuple[str, ...] = ()  # the image files, in the order of `crops`


class BuildContext:
    """Everything a build reads, loaded only when a stage that needs it must actually run."""

    def __init__(self, config: Config, model_name: str, reporter: Reporter, stages: list[Stage], root: Path | None = None):
        from pipeline.models import get_spec

        self.config = config
        # build/<model>/<target>: the bundle reads the checks' logits there
        self.root = root if root is not None else Path(config.build_dir) / model_name / config.target
        self.model_name = model_name
        self.spec = get_spec(model_name)
        self.reporter = reporter
        self.threads = config.openvino.threads or os.cpu_count() or 1
        self.preprocessing = self.spec.preprocessing
        if config.network.input_size:
            self.preprocessing = self.preprocessing.with_crop(config.network.input_size)
        # The reference runs on the largest evaluation set any check needs; smaller checks use a
        # prefix of it (balanced selection is prefix-stable).
        self.evaluation_count = max(self.check_images(stage) for stage in stages if stage.runner is not None)
        self.calibration_pool, self.evaluation_pool, self.class_names = self._image_pools()

    def check_images(self, stage: Stage) -> int:
        return self.config.quantization.evaluation_images if stage.int8 else self.config.data.evaluation_images

    def _image_pools(self):
        """Calibration and evaluation candidates: ImageNet's train-sample/ and val/, or the user's frames."""
        from calibration import datasets, sampling

        data = self.config.data
        if data.frames:
            scan = datasets.read_unlabelled_folder(Path(data.frames))
            self._warn_all(scan.problems)
            ordered = sampling.select_balanced(scan.records, len(scan.records), data.seed)
            held_out = min(self.evaluation_count, len(ordered) // 2)  # never more than half the frames
            class_names = self._imagenet_class_names(required=not self.config.network.labels)
            return ordered[held_out:], ordered[:held_out], class_names
        imagenet = datasets.open_imagenet(Path(data.imagenet))
        for part, folder in (("evaluation", "val/"), ("calibration", "train-sample/")):
            if getattr(imagenet, part) is None:
                raise PipelineError(f"{data.imagenet}: no {part} images ({folder}): point --imagenet at an ImageNet root "
                                    "holding synsets.txt, train-sample/ and val/")
        self._warn_all(imagenet.problems)
        return imagenet.calibration.records, imagenet.evaluation.records, imagenet.class_names

    def _imagenet_class_names(self, required: bool) -> list[str]:
        from calibration import datasets

        synsets = Path(self.config.data.imagenet) / datasets.SYNSETS_FILE
        if synsets.is_file():
            return [s.short_name for s in datasets.read_synsets(synsets)]
        if required:
            raise PipelineError(f"no class names: pass --labels (one name per line), or --imagenet with {synsets.name}")
        return []

    def _warn_all(self, problems) -> None:
        for problem in problems:
            self.reporter.warn(str(problem))

    def progress(self, what: str):
        return self.reporter.progress(what)

    @cached_property
    def evaluation_records(self):
        from calibration import sampling

        return sampling.select_balanced(self.evaluation_pool, self.evaluation_count, self.config.data.seed)

    @cached_property
    def calibration_records(self):
        from calibration import sampling

        count = self.config.data.calibration_images
        where = self.config.data.frames or f"{self.config.data.imagenet} (train-sample/)"
        sampling.require_at_least(self.calibration_pool, count, f"calibration images in {where}")
        records = sampling.select_balanced(self.calibration_pool, count, self.config.data.seed)
        sampling.assert_disjoint(records, self.evaluation_records)
        return records

    def _load(self, records, kind: str) -> ImageSet:
        from calibration import datasets

        loaded = datasets.load_images(records, self.preprocessing, progress=self.progress(f"loading {kind} images"))
        for skipped in loaded.skipped:
            self.reporter.warn(f"skipped {skipped}")
        if not len(loaded.crops):
            raise PipelineError(f"no readable images among the {len(records)} {kind} images")
        return ImageSet(loaded.crops, loaded.labels, datasets.records_digest(loaded.records),
                        tuple(str(record.path) for record in loaded.records))

    @cached_property
    def evaluation(self) -> ImageSet:
        return self._load(self.evaluation_records, "evaluation")

    @cached_property
    def evaluation_digest(self) -> str:
        from calibration import datasets

        return datasets.records_digest(self.evaluation_records)

    @cached_property
    def calibration(self) -> ImageSet:
        return self._load(self.calibration_records, "calibration")

    @cached_property
    def calibration_digest(self) -> str:
        from calibration import datasets

        return datasets.records_digest(self.calibration_records)

    def uses_imagenet_labels(self, num_classes: int) -> bool:
        """ImageNet's labels mean something only for a 1000-class head with ImageNet's class list."""
        return num_classes == 1000 and not self.config.network.labels and not self.config.data.frames

    def predict(self, runner, count: int, what: str) -> np.ndarray:
        """Logits of the first `count` evaluation images, normalised one batch at a time."""
        from pipeline.runners import predict

        return predict(runner, self.evaluation.crops[:count], self.config.data.batch_size,
                       progress=self.progress(what), prepare=self.preprocessing.normalize)

    def labels(self, reference: StageRecord) -> np.ndarray:
        """The evaluation labels, all -1 where they do not apply (a fine-tuned head, unlabelled frames)."""
        labels = np.load(reference.path(LABELS_FILE))
        num_classes = np.load(reference.path(LOGITS_FILE), mmap_mode="r").shape[1]
        return labels if self.uses_imagenet_labels(num_classes) else np.full_like(labels, -1)

    def labelled(self, reference: StageRecord) -> bool:
        return bool((self.labels(reference) >= 0).any())

    def judge(self, stage: str, reference: StageRecord, logits: np.ndarray) -> DriftResult:
        """Compare a stage's logits with the reference's on the same (first N) images, on its budget."""
        count = len(logits)
        expected = np.asarray(np.load(reference.path(LOGITS_FILE), mmap_mode="r")[:count])
        labels = self.labels(reference)[:count]
        budget = self.config.budget(stage, self.random_weights, labelled=bool((labels >= 0).any()))
        return compare(stage, expected, logits, labels, budget)

    @property
    def deployed_openvino_hint(self) -> str | None:
        """The precision OpenVINO computes deployed IRs in; None lets the CPU choose."""
        hint = self.config.openvino.inference_precision
        return None if hint == "auto" else hint

    @cached_property
    def weights_identity(self) -> dict:
        """What the weights are, for cache keys, without loading torch."""
        from pipeline import weights

        source = weights.resolve_weights(self.model_name, self.config.weights)
        identity = {"source": source.kind}
        if source.path is not None:
            identity["sha256"] = sha256_file(source.path)
        if source.kind == "random":
            from calibration import datasets

            identity.update(seed=self.config.data.seed, batchnorm_images=datasets.records_digest(self.batchnorm_records))
        return identity

    @property
    def random_weights(self) -> bool:
        return self.config.weights == "random"

    @cached_property
    def batchnorm_records(self):
        """The calibration images random weights re-estimate batch-norm statistics on."""
        from calibration import sampling

        return sampling.select_balanced(self.calibration_pool, self.config.data.batchnorm_images, self.config.data.seed)

    @cached_property
    def model(self):
        from pipeline import weights

        network = self.config.network
        batches = None
        if self.random_weights:
            crops = self._load(self.batchnorm_records, "batch-norm").crops
            size = self.config.data.batch_size * 4
            batches = (self.preprocessing.normalize(crops[i : i + size]) for i in range(0, len(crops), size))
        with self.reporter.status(f"loading {self.model_name} ({self.config.weights} weights)"):
            return weights.load_model(
                self.model_name,
                self.config.weights,
                num_classes=network.num_classes or None,
                input_size=network.input_size or None,
                residual_scales=network.residual_scales or None,
                bn_batches=batches,
                seed=self.config.data.seed,
            )

    def model_options(self) -> dict:
        network = self.config.network
        return {
            "model": self.model_name,
            "num_classes": network.num_classes,
            "input_size": self.preprocessing.crop,
            "residual_scales": list(network.residual_scales),
        }


def stage_key(stage: Stage, ctx: BuildContext, records: dict[str, StageRecord]) -> str:
    parts = {
        "stage": stage.name,
        "params": stage.params,
        "inputs": {name: records[name].key for name in stage.inputs},
        "tools": {tool: tool_version(tool) for tool in stage.tools},
        "code": _code_hash(stage, (ctx.spec.module, "pipeline.models.layers", "pipeline.weights") if stage.uses_weights else ()),
    }
    if stage.uses_weights:
        parts["weights"] = ctx.weights_identity
        parts["model"] = ctx.model_options()
    if stage.uses_evaluation_images:
        parts["evaluation"] = ctx.evaluation_digest
    if stage.uses_calibration_images:
        parts["calibration"] = ctx.calibration_digest
    if stage.uses_evaluation_images or stage.uses_calibration_images:
        parts["preprocessing"] = ctx.preprocessing.as_dict()
    return stable_hash(parts)


class Builder:
    """Builds one model for one target, stage by stage."""

    def __init__(self, config: Config, model_name: str, reporter: Reporter, force: bool = False):
        self.config = config
        self.reporter = reporter
        self.force = force
        self.stages = stages_for(config)
        self.root = Path(config.build_dir) / model_name / config.target
        self.ctx = BuildContext(config, model_name, reporter, self.stages, self.root)
        self.cache = ArtifactCache(self.root)
        self._precision_ran: dict[str, str] = {}

    def run(self) -> dict:
        self._prepare_root()
        self.cache.sweep_leftovers()
        records: dict[str, StageRecord] = {}
        drift: dict[str, DriftResult] = {}
        built: list[str] = []
        started = time.perf_counter()
        for stage in self.stages:
            try:
                records[stage.name], was_built = self._stage(stage, records)
            except DriftError:  # the INT8 gate could not meet its budget: say so in the manifest too
                manifest = self._manifest(records, drift, built, time.perf_counter() - started, failed=stage.name)
                write_json_atomic(self.root / "manifest.json", manifest)
                raise
            if was_built:
                built.append(stage.name)
            if stage.name == "bundle":
                self._write_archive(records["bundle"])
            if stage.name == "reference":  # the head's size is known now: check the labels early
                self._write_labels(self._num_classes(records))
            if stage.runner is not None:
                result = self._check(stage, records)
                drift[stage.name] = result
                self.reporter.drift_line(result)
                if not result.passed:
                    manifest = self._manifest(records, drift, built, time.perf_counter() - started, failed=stage.name)
                    write_json_atomic(self.root / "manifest.json", manifest)
                    raise DriftError(f"{self.ctx.model_name}: stage '{stage.name}' is over its drift budget: {'; '.join(result.failures)}")
        manifest = self._manifest(records, drift, built, time.perf_counter() - started)
        if self.config.target in GPU_TARGETS and "bundle" in records:
            manifest.update(self._engine(records["bundle"]))
        write_json_atomic(self.root / "manifest.json", manifest)
        if manifest.get("tensorrt", {}).get("passed") is False:
            raise DriftError(f"{self.ctx.model_name}: the TensorRT engine is over its drift budget: "
                             f"{'; '.join(manifest['tensorrt']['drift'].get('failures', []))}")
        return manifest

    def _write_archive(self, bundle: StageRecord) -> None:
        """bundle.tar.gz beside the bundle folder, rewritten only when the bundle is newer than it."""
        from pipeline.artifact import BUNDLE_ARCHIVE
        from pipeline.bundle import write_archive
        from pipeline.cache import MARKER

        archive = self.root / BUNDLE_ARCHIVE
        if archive.is_file() and archive.stat().st_mtime_ns >= bundle.path(MARKER).stat().st_mtime_ns:
            return
        with self.reporter.status("writing bundle.tar.gz"):
            write_archive(bundle.folder, archive)

    def _engine(self, bundle: StageRecord) -> dict:
        """GPU targets: build and check the engine here when TensorRT and a GPU are, else defer to the device."""
        try:
            from targets.tensorrt.device_info import tensorrt_status

            ok, reason = tensorrt_status()
        except ImportError as error:
            ok, reason = False, f"targets.tensorrt.device_info is not available ({error})"
        if not ok:
            self.reporter.say(f"  TensorRT engine: deferred to the device ({reason}): copy bundle.tar.gz there and run "
                              "`python -m pipeline device-build bundle.tar.gz`")
            return {"deferred": {"stage": "tensorrt", "reason": reason}}
        from pipeline.device_build import build_and_check

        result = build_and_check(bundle.folder, self.config.precision, self.reporter)
        drift = result.get("drift") or {}
        self.reporter.say(f"  TensorRT engine ({self.config.precision}): "
                          f"{'within budget' if result.get('passed') else 'over budget'}")
        return {"tensorrt": {"stage": f"tensorrt_{self.config.precision}", "passed": bool(result.get("passed")),
                             "drift": drift, "engine": result.get("engine"), "latency": result.get("latency"),
                             "throughput": result.get("throughput"), "device": result.get("device")}}

    def _prepare_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise PipelineError(f"build directory {self.root} cannot be written ({error.strerror}): choose another with --build-dir") from None

    def _stage(self, stage: Stage, records: dict[str, StageRecord]) -> tuple[StageRecord, bool]:
        key = stage_key(stage, self.ctx, records)
        if not self.force:
            lookup = self.cache.lookup(stage.name, key)
            if lookup.record is not None:
                self.reporter.stage_cached(stage)
                return lookup.record, False
            reason = lookup.reason
        else:
            reason = "--force"
        started = time.perf_counter()
        with self.reporter.stage_running(stage, reason):
            with self.cache.building(stage.name) as folder:
                info = stage.produce(self.ctx, records, folder)
                seconds = round(time.perf_counter() - started, 2)
                info = {
                    "description": stage.description,
                    "artifact": stage.artifact,
                    "inputs": {name: records[name].key for name in stage.inputs},
                    "params": stage.params,
                    "tools": {tool: tool_version(tool) for tool in stage.tools},
                    "seconds": seconds,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **info,
                }
                record = self.cache.commit(stage.name, key, folder, info)
        self.reporter.stage_built(stage, seconds)
        return record, True

    def _check(self, stage: Stage, records: dict[str, StageRecord]) -> DriftResult:
        """Run the artifact on the evaluation images (cached like a stage) and compare with torch."""
        record = records[stage.name]
        count = self.ctx.check_images(stage)
        check_name = f"check_{stage.name}"
        key = stable_hash({
            "artifact": record.key,
            "evaluation": records["reference"].key,
            "images": count,
            "settings": stage.check_settings,
            "code": _code_hash(stage),
        })
        lookup = self.cache.lookup(check_name, key) if not self.force else None
        if stage.self_checked:  # the stage ran its artifact already (the INT8 gate's final attempt)
            self._precision_ran[stage.name] = "int8+fp32"  # ONNX Runtime's CPU provider: float between Q/DQ
            return self.ctx.judge(stage.name, records["reference"], np.load(record.path(LOGITS_FILE)))
        if lookup is not None and lookup.record is not None:
            checked = lookup.record
        else:
            with self.cache.building(check_name) as folder:
                runner = stage.runner(self.ctx, record)
                np.save(folder / LOGITS_FILE, self.ctx.predict(runner, count, f"checking {stage.name}"))
                ran = getattr(runner, "execution_precision", "fp32")
                info = {"runner": runner.name, "precision_ran": f"int8+{ran}" if stage.int8 else ran,
                        "artifact_key": record.key}
                checked = self.cache.commit(check_name, key, folder, info)
        self._precision_ran[stage.name] = checked.data.get("precision_ran")
        return self.ctx.judge(stage.name, records["reference"], np.load(checked.path(LOGITS_FILE)))

    @staticmethod
    def _num_classes(records: dict[str, StageRecord]) -> int:
        return int(np.load(records["reference"].path(LOGITS_FILE), mmap_mode="r").shape[1])

    def _write_labels(self, num_classes: int) -> None:
        """Every artifact carries its labels.txt: the user's file, or ImageNet's class names."""
        if self.config.network.labels:
            source = Path(self.config.network.labels)
            try:
                names = [line.strip() for line in source.read_text().splitlines() if line.strip()]
            except OSError as error:
                raise PipelineError(f"{source}: cannot read the labels file ({error.strerror})") from None
        else:
            names = list(self.ctx.class_names)
        if len(names) != num_classes:
            raise PipelineError(f"labels: {len(names)} names for a {num_classes}-class network: pass --labels with one name per class")
        text = "".join(f"{name}\n" for name in names)
        path = self.root / "labels.txt"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".txt.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def _manifest(self, records, drift, built, seconds, failed: str | None = None) -> dict:
        ctx = self.ctx
        deployed = deployed_stage(self.config)
        return {
            "pipeline_version": __version__,
            "model": ctx.model_name,
            "target": self.config.target,
            "precision": self.config.precision,
            "status": f"failed at {failed}" if failed else "ok",
            "deployed": {
                "stage": deployed,
                "artifact": f"{deployed}/{records[deployed].data['artifact']}" if deployed in records else None,
                "inference_precision": None if self.config.target in GPU_TARGETS  # OpenVINO's; TensorRT's is the engine's
                else "f32" if self.config.precision == "fp32" else self.config.openvino.inference_precision,
                "int8_layers_in_float": records["quantize"].data.get("excluded_layers") if "quantize" in records else None,
            },
            "bundle": {"folder": "bundle", "archive": "bundle.tar.gz"} if "bundle" in records else None,
            "weights": {**ctx.weights_identity, "random": ctx.random_weights,
                        "note": "random weights: accuracy figures are meaningless; drift is judged on mean-centred logits"
                        if ctx.random_weights else ""},
            "preprocessing": ctx.preprocessing.as_dict(),
            "input": {"name": "input", "layout": "NCHW", "size": ctx.preprocessing.crop},
            "labels": "labels.txt",
            "evaluation_images": len(np.load(records["reference"].path(LOGITS_FILE))) if "reference" in records else 0,
            "seed": self.config.data.seed,
            "host": {"python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_name()},
            "seconds": round(seconds, 2),
            "built_this_run": built,
            "stages": {
                name: {
                    "folder": name,
                    "key": record.key,
                    "artifact": record.data.get("artifact"),
                    "files": record.data.get("files"),
                    "tools": record.data.get("tools"),
                    "params": record.data.get("params"),
                    "built_at": record.data.get("built_at"),
                    "build_seconds": record.data.get("seconds"),
                    "precision_ran": self._precision_ran.get(name),
                    "facts": {k: v for k, v in record.data.items() if k not in _RECORD_FIELDS},
                    "drift": drift[name].as_dict() if name in drift else None,
                }
                for name, record in records.items()
            },
        }


# Fields of a stage.json that the manifest lists under their own names; the rest are the stage's facts.
_RECORD_FIELDS = {"stage", "key", "files", "tools", "params", "inputs", "built_at", "seconds", "description", "artifact"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
