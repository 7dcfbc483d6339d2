"""What a build reads, loaded only when a stage that needs it must actually run: the images, the
model, the labels, and how a stage's logits are judged against the reference."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from pipeline.cache import StageRecord, sha256_file
from pipeline.drift import DriftResult, compare
from pipeline.errors import PipelineError
from pipeline.layout import IMAGE_DIGESTS, LABELS_FILE, LOGITS_FILE
from pipeline.recorded_images import RecordedImages

if TYPE_CHECKING:
    from pipeline.progress import Reporter


@dataclass(frozen=True)
class ImageSet:
    """Center-cropped uint8 images (N, H, W, 3), labels (-1 where unknown), the digest of the files."""

    crops: np.ndarray
    labels: np.ndarray
    digest: str
    paths: tuple[str, ...] = ()  # the image files, in the order of `crops`


class BuildContext:
    """Everything a build reads, loaded only when a stage that needs it must actually run."""

    def __init__(self, plan, reporter: "Reporter"):
        """`plan`: the build's `pipeline.plan.BuildPlan` (not imported here: the plan holds the stage graph,
        whose stages receive this context)."""
        from pipeline.models import preprocessing, source

        config = plan.config
        self.plan = plan
        self.config = config
        self.root = plan.root  # the bundle reads the checks' logits there
        self.source = plan.source  # a registered network, your ONNX file or your module (pipeline.models.source)
        self.model_name = self.source.name
        self.spec = self.source.spec  # None for your own model
        source.check_options(self.source, config)
        self.reporter = reporter
        self.threads = config.openvino.threads or os.cpu_count() or 1
        # What the artifacts take, and what the network itself takes (folded in by the export stage).
        self.preprocessing, self.model_input = preprocessing.for_source(self.source, config)
        self.evaluation_count = plan.evaluation_count
        self._imagenet = None  # the ImageNet root read (calibration.imagenet.ImageNetData); None with frames
        self._frames_skipped = ()
        self.decode_skipped: dict[str, tuple] = {}  # "evaluation" / "calibration": files that did not decode
        self.recorded = RecordedImages(plan.root / IMAGE_DIGESTS, self._selection())

    @cached_property
    def _pools(self) -> tuple:
        """(calibration pool, evaluation pool, class names): the image folders are read only when a stage needs
        them, so a fully cached rebuild runs without its images (`RecordedImages`)."""
        return self._image_pools()

    @property
    def calibration_pool(self):
        return self._pools[0]

    @property
    def evaluation_pool(self):
        return self._pools[1]

    @property
    def class_names(self) -> list[str]:
        return self._pools[2]

    def _selection(self) -> dict:
        """What chooses the images of a build, but for the files themselves: equal selections of the same files
        give the same image lists."""
        data, quantization = self.config.data, self.config.quantization
        return {"frames": bool(data.frames), "seed": data.seed, "evaluation": self.evaluation_count,
                "calibration": data.calibration_images, "batchnorm": data.batchnorm_images,
                "decision": quantization.decision_images}

    def _digest(self, name: str, records: str) -> str:
        """The content digest of an image list (a cache key part). When the images cannot be read, the digest
        recorded by the last build with the same selection stands in, so cached stages stay cached; a stage
        that must be built still needs the images and says so."""
        from calibration import images

        try:
            image_records = getattr(self, records)
        except PipelineError as error:
            recorded = self.recorded.get(name)
            if recorded is None:
                raise
            self.recorded.warn_once(self.reporter, error)
            return recorded
        digest = images.records_digest(image_records)
        self.recorded.put(name, digest, self._data_folder())
        return digest

    def _data_folder(self) -> str:
        return str(Path(self.config.data.frames or self.config.data.imagenet).absolute())

    def _image_pools(self):
        """Calibration and evaluation candidates: an ImageNet root in any layout it has (`calibration.imagenet`),
        or the user's frames."""
        from calibration import datasets, imagenet

        data = self.config.data
        if data.frames:
            scan = datasets.read_unlabelled_folder(Path(data.frames))
            self.scan_skipped = scan.problems
            self._warn_all(scan.problems)
            ordered = self._select(scan.records, len(scan.records))
            held_out = min(self.evaluation_count, len(ordered) // 2)  # never more than half the frames
            class_names = [s.short_name for s in imagenet.class_list(Path(data.imagenet))]
            return ordered[held_out:], ordered[:held_out], class_names
        where = f"--imagenet / IMAGENET_DIR = {Path(data.imagenet).absolute()}"
        try:
            root = imagenet.open_imagenet(Path(data.imagenet))
        except PipelineError as error:  # the calibration layer names the folder; the user needs the option too
            raise PipelineError(f"{where}: {error}") from None
        for part, folder in (("evaluation", "val/"), ("calibration", "train-sample/ or train/")):
            if getattr(root, part) is None:
                raise PipelineError(f"{where}: no {part} images ({folder}); {imagenet.LAYOUTS}")
        self._imagenet = root
        self._warn_all(root.problems)
        return root.calibration, root.evaluation.records, root.class_names

    @property
    def scan_skipped(self) -> tuple:
        """Files the dataset scans left out (calibration.datasets.Skipped), train/ as far as it was listed;
        nothing when no stage needed the images (a cached rebuild)."""
        return self._imagenet.skipped if self._imagenet is not None else self._frames_skipped

    @scan_skipped.setter
    def scan_skipped(self, value: tuple) -> None:
        self._frames_skipped = value

    def _select(self, pool, count: int, exclude=frozenset()):
        """`count` images of `pool`, balanced and seeded (`calibration.sampling`), leaving out the paths in `exclude`.
        A train/ tree (`ClassFolders`) selects lazily, listing only the class folders it reaches."""
        from calibration import sampling
        from calibration.class_folders import ClassFolders

        if isinstance(pool, ClassFolders):
            return pool.select(count, self.config.data.seed, exclude)
        return sampling.select_balanced([r for r in pool if r.path not in exclude], count, self.config.data.seed)

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
        where = self.config.data.frames or f"{self.config.data.imagenet} (train-sample/ or train/)"
        records = self._select(self.calibration_pool, count)
        sampling.require_at_least(records, count, f"calibration images in {where}")  # fewer: all were selected
        sampling.assert_disjoint(records, self.evaluation_records)
        return records

    @cached_property
    def decision_records(self):
        """The images the INT8 gate decides on: from the calibration pool (train-sample/, or the frames not held
        out), never a calibration image, so nothing that searches sees the images the build reports on."""
        from calibration import sampling

        count = self.config.quantization.decision_images
        calibration = {record.path for record in self.calibration_records}
        records = self._select(self.calibration_pool, count, exclude=calibration)
        where = self.config.data.frames or f"{self.config.data.imagenet} (train-sample/ or train/)"
        if not records:
            raise PipelineError(f"no images left in {where} for the INT8 gate to decide on: all {len(calibration)} "
                                "are calibration images; lower data.calibration_images or add images")
        if len(records) < count:  # fewer selected than asked: every image left was taken
            self.reporter.warn(f"the INT8 gate decides on the {len(records)} images of {where} left after calibration "
                               f"(quantization.decision_images asks for {count})")
        sampling.assert_disjoint(records, self.evaluation_records)
        return records

    @cached_property
    def decision(self) -> ImageSet:
        return self._load(self.decision_records, "gate decision")

    @cached_property
    def decision_digest(self) -> str:
        return self._digest("decision", "decision_records")

    def _load(self, records, kind: str) -> ImageSet:
        from calibration import images

        loaded = images.load_images(records, self.preprocessing, progress=self.progress(f"loading {kind} images"))
        self.decode_skipped[kind] = loaded.skipped  # recorded by the stage that decoded them (Builder)
        for skipped in loaded.skipped:
            self.reporter.warn(f"skipped {skipped}")
        if not len(loaded.crops):
            raise PipelineError(f"no readable images among the {len(records)} {kind} images")
        return ImageSet(loaded.crops, loaded.labels, images.records_digest(loaded.records),
                        tuple(str(record.path) for record in loaded.records))

    @cached_property
    def evaluation(self) -> ImageSet:
        return self._load(self.evaluation_records, "evaluation")

    def evaluation_head(self, count: int) -> ImageSet:
        """The first `count` evaluation images that decode (the bundle's golden images): the loaded set's prefix,
        or, for a set too large to keep (`pipeline.executor.local.KEEP_DECODED`), only those decoded."""
        from calibration import images
        from pipeline.executor.local import KEEP_DECODED

        if "evaluation" in self.__dict__ or len(self.evaluation_records) <= KEEP_DECODED:
            loaded = self.evaluation
            return ImageSet(loaded.crops[:count], loaded.labels[:count], loaded.digest, loaded.paths[:count])
        kept = []
        for batch in images.iter_batches(self.evaluation_records, self.preprocessing, batch_size=count):
            kept.append(batch)
            if sum(len(b) for b in kept) >= count:
                break
        crops, labels = np.concatenate([b.crops for b in kept])[:count], np.concatenate([b.labels for b in kept])[:count]
        records = tuple(r for b in kept for r in b.records)[:count]
        return ImageSet(crops, labels, images.records_digest(records), tuple(str(r.path) for r in records))

    @cached_property
    def evaluation_digest(self) -> str:
        return self._digest("evaluation", "evaluation_records")

    @cached_property
    def calibration(self) -> ImageSet:
        return self._load(self.calibration_records, "calibration")

    @cached_property
    def calibration_digest(self) -> str:
        return self._digest("calibration", "calibration_records")

    def uses_imagenet_labels(self, num_classes: int) -> bool:
        """ImageNet's labels mean something only for a 1000-class head with ImageNet's class list."""
        return num_classes == 1000 and not self.config.network.labels and not self.config.data.frames

    def predict(self, runner, count: int, what: str) -> np.ndarray:
        """Logits of the first `count` evaluation images, normalised one batch at a time."""
        from targets.runner import predict

        return predict(runner, self.evaluation.crops[:count], self.config.data.batch_size,
                       progress=self.progress(what), prepare=self.preprocessing.normalize)

    @cached_property
    def executor(self):
        """Where evaluations run: this process, or shards on Ray (`pipeline.executor`, `executor.kind`)."""
        from pipeline.executor import executor_for

        return executor_for(self.config.executor, self.config.data.batch_size, self.reporter)

    def images(self, kind: str):
        """The evaluation, calibration or gate decision images as an executor takes them (`pipeline.executor.Images`)."""
        from pipeline.executor.requests import Images

        name = {"evaluation": "evaluation", "calibration": "calibration", "gate decision": "decision"}[kind]
        records = getattr(self, f"{name}_records")  # only this set is selected: an FP32 build has no calibration
        return Images(kind, records, lambda: getattr(self, name))

    def evaluate(self, spec, count: int, what: str, kind: str = "evaluation"):
        """`Predictions` of the artifact `spec` (`pipeline.executor.work.RunnerSpec`) on the first `count` images of
        `kind`, through the configured executor."""
        predictions = self.executor.predict(spec, self.images(kind), count, what, self.preprocessing)
        self.record_skipped(kind, predictions.skipped)
        return predictions

    def record_skipped(self, kind: str, skipped: tuple) -> None:
        """Files an executor's workers could not decode (a Ray run decodes there): the build's, as if decoded here."""
        if skipped:
            self.decode_skipped[kind] = skipped
            for each in skipped:
                self.reporter.warn(f"skipped {each}")

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
        budget = self.plan.budget(stage, labelled=bool((labels >= 0).any()))
        return compare(stage, expected, logits, labels, budget)

    @property
    def deployed_openvino_hint(self) -> str | None:
        """The precision OpenVINO computes deployed IRs in; None lets the CPU choose."""
        from targets.openvino import precision_hint

        return precision_hint(self.config.openvino.inference_precision)

    @cached_property
    def weights_identity(self) -> dict:
        """What the weights are, for cache keys, without loading torch."""
        from pipeline import weights

        if self.source.kind == "onnx":  # the file by its content, wherever it lies
            return {"source": "onnx", "sha256": sha256_file(self.source.path)}
        if self.source.kind == "factory":  # the function by name; its module's source is in stage_key's code
            return {"source": "factory", "factory": self.source.argument}
        source = weights.resolve_weights(self.model_name, self.config.weights)
        identity = {"source": source.kind}
        if source.path is not None:
            identity["sha256"] = sha256_file(source.path)
        if source.kind == "random":
            identity.update(seed=self.config.data.seed, batchnorm_images=self._digest("batchnorm", "batchnorm_records"))
        return identity

    @property
    def random_weights(self) -> bool:
        return self.plan.random_weights

    @cached_property
    def batchnorm_records(self):
        """The calibration images random weights re-estimate batch-norm statistics on."""
        return self._select(self.calibration_pool, self.config.data.batchnorm_images)

    @cached_property
    def model(self):
        """The torch network (`.module`, `.input_size`): ours with its weights, or your factory's module."""
        from pipeline import weights
        from pipeline.models import source

        if self.source.kind == "factory":  # an ONNX file has no torch network: see `reference_spec`
            with self.reporter.status(f"loading {self.source.argument}"):
                module = source.adapt_input(source.load_factory(self.source), self.model_input.layout,
                                            self.model_input.channels)
            return source.FactoryModel(module, self.preprocessing.crop)
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

    def reference_spec(self):
        """The FP32 reference (`pipeline.executor.work.RunnerSpec`): ONNX Runtime on your ONNX file as it is, else
        torch on the network."""
        from pipeline.executor.work import RunnerSpec

        if self.source.kind == "onnx":
            return RunnerSpec("onnx_file", str(self.source.path), {"layout": self.model_input.layout,
                                                                    "channels": self.model_input.channels,
                                                                    "threads": self.threads})
        return RunnerSpec("torch", module=self.model.module)

    def model_options(self) -> dict:
        network = self.config.network
        return {
            "model": self.model_name,
            **({"model_input": self.model_input.as_dict()} if self.source.own else {}),
            "num_classes": network.num_classes,
            "input_size": self.preprocessing.crop,
            "residual_scales": list(network.residual_scales),
        }
