"""What an executor hands a worker, and what the worker does with it: small picklable descriptions, never
the build context.

- `RunnerSpec`: how to open an artifact through the normal back-end layer (`targets/`): the back end, the file,
  its options (and, for the torch reference only, the module itself, which pickles with its weights).
- `Shard`: a run of images (their records: path and label), the preprocessing and the batch size.

The functions below run in a worker (a Ray task) or in the build's own process alike: each opens the artifact
once, decodes its shard batch by batch (memory: one batch of crops) and returns numpy results. Shards start on
a multiple of the batch size, so every batch a back end sees is the batch the local run gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.datasets import ImageRecord, Skipped
from calibration.preprocess import Preprocessing

BACKENDS = ("torch", "onnxruntime", "openvino", "onnx_file")


@dataclass(frozen=True)
class RunnerSpec:
    """How to open one artifact: `open()` makes the runner, in whichever process calls it."""

    backend: str  # one of BACKENDS
    path: str = ""  # the ONNX file or the IR's .xml; "" for torch
    options: dict = field(default_factory=dict)  # the runner's keyword arguments (threads, fp16_typed, ...)
    module: Any = None  # torch only: the nn.Module in eval mode

    def open(self):
        if self.backend == "torch":
            from targets.pytorch import TorchRunner

            return TorchRunner(self.module, **self.options)
        if self.backend == "onnxruntime":
            from targets.onnxruntime import OnnxRuntimeRunner

            return OnnxRuntimeRunner(self.path, **self.options)
        if self.backend == "openvino":
            from targets.openvino import OpenVinoRunner

            return OpenVinoRunner(self.path, **self.options)
        if self.backend == "onnx_file":  # your ONNX file as it is: the FP32 reference of a `--model PATH.onnx` build
            from pipeline.models.onnx_file import SourceRunner, inspect

            return SourceRunner(inspect(Path(self.path), self.options["layout"]), self.options["channels"],
                                self.options.get("threads"))
        raise ValueError(f"unknown back end {self.backend!r} (known: {', '.join(BACKENDS)})")


def onnxruntime_spec(path, threads: int | None, fp16_typed: bool = False, exact: bool = False) -> RunnerSpec:
    options = {"threads": threads, "fp16_typed": fp16_typed}
    return RunnerSpec("onnxruntime", str(path), {**options, "exact": True} if exact else options)


def openvino_spec(path, inference_precision: str | None, threads: int | None) -> RunnerSpec:
    return RunnerSpec("openvino", str(path), {"inference_precision": inference_precision, "threads": threads})


@dataclass(frozen=True)
class Shard:
    records: tuple[ImageRecord, ...]
    preprocessing: Preprocessing
    batch_size: int


@dataclass(frozen=True)
class ShardLogits:
    """One shard's logits, the records kept (in order) and the files that did not decode."""

    logits: np.ndarray
    records: tuple[ImageRecord, ...]
    skipped: tuple[Skipped, ...]
    runner: str  # what ran, as the runner names itself
    precision: str  # the precision that really ran (`execution_precision`)


def _batches(shard: Shard):
    from calibration.images import iter_batches

    for batch in iter_batches(shard.records, shard.preprocessing, batch_size=shard.batch_size):
        yield batch


def predict_shard(spec: RunnerSpec, shard: Shard, progress=None) -> ShardLogits:
    """Open the artifact once and run it on the shard's images, batch by batch (`progress(done, total)` after each)."""
    from targets.runner import close, images_as_input

    runner = spec.open()
    try:
        logits, kept, skipped = [], [], []
        for batch in _batches(shard):
            skipped.extend(batch.skipped)
            if len(batch.records):
                x = images_as_input(shard.preprocessing.normalize(batch.crops))
                logits.append(runner.run({runner.input_name: x})[runner.output_name])
                kept.extend(batch.records)
            if progress is not None:
                progress(len(kept) + len(skipped), len(shard.records))
        classes = logits[0].shape[1] if logits else 0
        return ShardLogits(np.concatenate(logits) if logits else np.zeros((0, classes), np.float32), tuple(kept),
                           tuple(skipped), runner.name, getattr(runner, "execution_precision", "fp32"))
    finally:
        close(runner)


def shard_maxima(onnx_path: str, tensors: list[str], shard: Shard,
                 threads: int | None) -> tuple[np.ndarray, int, tuple[Skipped, ...]]:
    """Calibration's first pass on one shard: max |x| of every tensor, the images read and the files skipped."""
    from calibration.statistics import TensorReader, update_maxima

    reader = TensorReader(_path(onnx_path), tensors, threads)
    maxima, images, skipped = np.zeros(len(reader.names), np.float64), 0, []
    for batch in _batches(shard):
        skipped.extend(batch.skipped)
        if len(batch.records):
            update_maxima(maxima, reader.run(batch.inputs()), reader)
            images += len(batch.records)
    return maxima, images, tuple(skipped)


def shard_histograms(onnx_path: str, tensors: list[str], shard: Shard, threads: int | None, maxima: np.ndarray,
                     bins: int) -> np.ndarray:
    """Calibration's second pass on one shard: histograms of |x| over [0, the merged maxima]."""
    from calibration.statistics import TensorReader, update_histograms

    reader = TensorReader(_path(onnx_path), tensors, threads)
    hists = np.zeros((len(reader.names), bins), np.int64)
    for batch in _batches(shard):
        if len(batch.records):
            update_histograms(hists, reader.run(batch.inputs()), maxima)
    return hists


def _path(path: str):
    from pathlib import Path

    return Path(path)
