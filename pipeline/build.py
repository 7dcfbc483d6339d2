"""Runs a model's stage graph: cache lookups, building, a drift check after every stage, the manifest."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline import __version__, diskspace
from pipeline import skipped as skipped_images
from pipeline.cache import (
    ArtifactCache,
    StageRecord,
    sha256_file,
    stable_hash,
    write_json_atomic,
)
from pipeline.config import Config
from pipeline.context import BuildContext
from pipeline.drift import DriftResult
from pipeline.errors import DriftError, PipelineError
from pipeline.interrupts import at_stage
from pipeline.layout import LABELS, LOGITS_FILE, MANIFEST, check_folder
from pipeline.measure.machine import cpu_name
from pipeline.plan import BuildPlan
from pipeline.progress import Reporter
from pipeline.stages import Stage


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


def stage_key(stage: Stage, ctx: BuildContext, records: dict[str, StageRecord]) -> str:
    parts = {
        "stage": stage.name,
        "params": stage.params,
        "inputs": {name: records[name].key for name in stage.inputs},
        "tools": {tool: tool_version(tool) for tool in stage.tools},
        "code": _code_hash(stage, ctx.source.code_modules() if stage.uses_weights else ()),
    }
    if stage.uses_weights:
        parts["weights"] = ctx.weights_identity
        parts["model"] = ctx.model_options()
    if stage.uses_evaluation_images:
        parts["evaluation"] = ctx.evaluation_digest
    if stage.uses_calibration_images:
        parts["calibration"] = ctx.calibration_digest
    if stage.uses_decision_images:
        parts["decision"] = ctx.decision_digest
    if stage.uses_evaluation_images or stage.uses_calibration_images or stage.uses_decision_images:
        parts["preprocessing"] = ctx.preprocessing.as_dict()
    return stable_hash(parts)


class Builder:
    """Builds one model for one target, stage by stage."""

    def __init__(self, config: Config, model_name: str, reporter: Reporter, force: bool = False):
        self.config = config
        self.reporter = reporter
        self.force = force
        self.plan = BuildPlan(config, model_name)
        self.ctx = BuildContext(self.plan, reporter)
        self.stages = self.plan.stages
        self.root = self.plan.root
        self.cache = ArtifactCache(self.root)
        self._precision_ran: dict[str, str] = {}
        self._current: str | None = None  # the stage being built or checked, for "interrupted in ..."

    def run(self) -> dict:
        """Build every stage; an interruption is re-raised naming the stage it stopped. A build that fails
        before anything is built leaves no empty folders behind."""
        made = [folder for folder in (self.root.parent, self.root) if not folder.exists()]
        try:
            return self._run_naming_the_stage()
        except BaseException:
            for folder in reversed(made):  # the target's folder, then the model's, each only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def _run_naming_the_stage(self) -> dict:
        try:
            return self._run()
        except KeyboardInterrupt as error:
            raise at_stage(error, self._current) from None
        except OSError as error:  # the manifest, labels.txt or bundle.tar.gz on a full disk
            if error.errno not in diskspace.FULL:
                raise
            raise diskspace.out_of_space(error.errno, self.root, self._current or "setup", 0, None) from None

    def _run(self) -> dict:
        self._prepare_root()
        self.cache.sweep_leftovers()
        records: dict[str, StageRecord] = {}
        drift: dict[str, DriftResult] = {}
        built: list[str] = []
        started = time.perf_counter()
        for stage in self.stages:
            self._current = stage.name
            try:
                records[stage.name], was_built = self._stage(stage, records)
            except DriftError:  # the INT8 gate could not meet its budget: say so in the manifest too
                manifest = self._manifest(records, drift, built, time.perf_counter() - started, failed=stage.name)
                write_json_atomic(self.root / MANIFEST, manifest)
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
                    write_json_atomic(self.root / MANIFEST, manifest)
                    raise DriftError(f"{self.ctx.model_name}: stage '{stage.name}' is over its drift budget: {'; '.join(result.failures)}")
        manifest = self._manifest(records, drift, built, time.perf_counter() - started)
        self._current = "manifest"
        if self.plan.gpu and "bundle" in records:
            self._current = "tensorrt"
            manifest.update(self._engine(records["bundle"]))
        write_json_atomic(self.root / MANIFEST, manifest)
        if manifest.get("tensorrt", {}).get("passed") is False:
            raise DriftError(f"{self.ctx.model_name}: the TensorRT engine is over its drift budget: "
                             f"{'; '.join(manifest['tensorrt']['drift'].get('failures', []))}")
        return manifest

    def _write_archive(self, bundle: StageRecord) -> None:
        """bundle.tar.gz beside the bundle folder, rewritten only when the bundle is newer than it."""
        from pipeline.artifact import BUNDLE_ARCHIVE
        from pipeline.cache import MARKER
        from pipeline.stages.bundle.package import write_archive

        archive = self.root / BUNDLE_ARCHIVE
        if archive.is_file() and archive.stat().st_mtime_ns >= bundle.path(MARKER).stat().st_mtime_ns:
            return
        with self.reporter.status("writing bundle.tar.gz"):
            write_archive(bundle.folder, archive)

    def _engine(self, bundle: StageRecord) -> dict:
        from pipeline.stages.tensorrt import engine_step

        return engine_step(bundle, self.config.precision, self.reporter)

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
        with self.reporter.stage_running(stage, reason), self.cache.building(stage.name) as folder, \
                self._space_guard(stage.name, folder):
            info = stage.produce(self.ctx, records, folder)
            seconds = round(time.perf_counter() - started, 2)
            if skipped := skipped_images.decoded_by(self.ctx, stage):  # kept with the stage: see pipeline/skipped.py
                info["skipped_images"] = skipped
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

    @contextmanager
    def _space_guard(self, name: str, folder: Path) -> Iterator[None]:
        """A full disk or file-size limit while `name` writes `folder`: one line saying how much it needs."""
        try:
            yield
        except Exception as error:
            code = diskspace.cause(error, folder)
            if code is None:
                raise
            previous = self.cache.lookup_size(name)
            raise diskspace.out_of_space(code, self.root, name, diskspace.folder_bytes(folder), previous) from None

    def _check(self, stage: Stage, records: dict[str, StageRecord]) -> DriftResult:
        """Run the artifact on the evaluation images (cached like a stage) and compare with torch."""
        record = records[stage.name]
        count = self.plan.check_images(stage)
        check_name = check_folder(stage.name)
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
            with self.cache.building(check_name) as folder, self._space_guard(check_name, folder):
                predictions = self.ctx.evaluate(stage.runner(self.ctx, record), count, f"checking {stage.name}")
                np.save(folder / LOGITS_FILE, predictions.logits)
                ran = predictions.precision
                info = {"runner": predictions.runner, "precision_ran": f"int8+{ran}" if stage.int8 else ran,
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
            try:
                names = list(self.ctx.class_names)
            except PipelineError:
                if (self.root / LABELS).is_file():  # a cached rebuild without its images: the labels stand
                    return
                raise
        if len(names) != num_classes:
            raise PipelineError(f"labels: {len(names)} names for a {num_classes}-class network: pass --labels with one name per class")
        text = "".join(f"{name}\n" for name in names)
        path = self.root / LABELS
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".txt.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def _manifest(self, records, drift, built, seconds, failed: str | None = None) -> dict:
        from targets.openvino import inference_precision

        ctx = self.ctx
        deployed = self.plan.deployed_stage
        return {
            "pipeline_version": __version__,
            "model": ctx.model_name,
            "target": self.config.target,
            "precision": self.config.precision,
            "status": f"failed at {failed}" if failed else "ok",
            "deployed": {
                "stage": deployed,
                "artifact": f"{deployed}/{records[deployed].data['artifact']}" if deployed in records else None,
                "inference_precision": None if self.plan.gpu  # OpenVINO's; TensorRT's is the engine's
                else inference_precision(self.config.precision, self.config.openvino.inference_precision),
                "int8_layers_in_float": records["quantize"].data.get("excluded_layers") if "quantize" in records else None,
            },
            "bundle": {"folder": "bundle", "archive": "bundle.tar.gz"} if "bundle" in records else None,
            "weights": {**ctx.weights_identity, "random": ctx.random_weights,
                        "note": "random weights: accuracy figures are meaningless; drift is judged on mean-centred logits"
                        if ctx.random_weights else ""},
            "model_source": ctx.source.describe(),
            "preprocessing": ctx.preprocessing.as_dict(),
            "model_input": ctx.model_input.as_dict(),
            "input": {"name": "input", "layout": "NCHW", "size": ctx.preprocessing.crop},
            "labels": LABELS,
            "skipped_images": skipped_images.summary(ctx, records),
            "evaluation_images": len(np.load(records["reference"].path(LOGITS_FILE))) if "reference" in records else 0,
            "seed": self.config.data.seed,
            "host": {"python": platform.python_version(), "machine": platform.machine(), "processor": cpu_name()},
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
_RECORD_FIELDS = {"stage", "key", "files", "tools", "params", "inputs", "built_at", "seconds", "description", "artifact",
                  "skipped_images"}

