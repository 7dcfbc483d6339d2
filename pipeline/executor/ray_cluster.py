"""The Ray executor: each evaluation split into shards of images that Ray tasks run, each opening the artifact
once through `targets/` (`pipeline.executor.work`); results come back in image order.

`executor.address` "" starts a Ray instance on this machine (or joins the one this process already started);
"auto" or "ray://host:10001" joins a running cluster. Every node needs this project installed and must see the
build folder and the ImageNet root under the same paths (artifacts and images travel as paths, not bytes).

A task whose worker dies (killed, out of memory, a lost node) is run again by Ray (`TASK_RETRIES`); a shard's
result depends only on its images and its artifact, so a retried shard gives the same logits.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import replace

import numpy as np

import ray

from pipeline.errors import PipelineError
from pipeline.executor.requests import Images, Predictions, first_decodable, predictions_of
from pipeline.executor.work import RunnerSpec, Shard, predict_shard, shard_histograms, shard_maxima

TASK_RETRIES = 3  # Ray re-runs a task whose worker died this many times before the build fails


def connect(address: str) -> None:
    """Join the cluster at `address` ("" = start or reuse one on this machine) unless this process has."""
    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with one that exits at once (status 1); the command's own
    # (pipeline.interrupts) unwinds the build first: temporary folders removed, lock released, exit 143.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise PipelineError(f"executor.address / --ray-address {address!r}: cannot join a Ray cluster "
                            f"({str(error).splitlines()[0]}); start one with `ray start --head`") from None
    finally:
        if threading.current_thread() is threading.main_thread() and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _remote(function):
    return ray.remote(max_retries=TASK_RETRIES)(function)


_predict_shard = _remote(predict_shard)
_shard_maxima = _remote(shard_maxima)
_shard_histograms = _remote(shard_histograms)


class RayExecutor:
    kind = "ray"

    def __init__(self, options, batch_size: int, reporter):
        connect(options.address)
        self.batch_size = batch_size
        self.reporter = reporter
        self.worker_cpus = options.worker_cpus
        # A shard starts on a batch boundary, so the back end sees the batches of a local run.
        self.shard_images = -(-options.shard_images // batch_size) * batch_size

    def _shards(self, records, preprocessing) -> list[Shard]:
        return [Shard(tuple(records[start:start + self.shard_images]), preprocessing, self.batch_size)
                for start in range(0, len(records), self.shard_images)]

    def _options(self, spec: RunnerSpec) -> RunnerSpec:
        """A worker runs on the CPUs Ray gives its task (Ray sets OMP_NUM_THREADS for torch likewise)."""
        if "threads" not in spec.options:
            return spec
        return replace(spec, options={**spec.options, "threads": self.worker_cpus})

    def _gather(self, refs: list, what: str) -> list:
        """The tasks' results in submission order, reporting progress as they finish."""
        progress = self.reporter.progress(what)
        pending, done = list(refs), 0
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                done += len(finished)
                progress(done, len(refs))
            return ray.get(refs)
        except ray.exceptions.RayTaskError as error:  # a worker's PipelineError is the build's
            cause = getattr(error, "cause", None)
            if isinstance(cause, PipelineError):
                raise PipelineError(str(cause)) from None
            raise

    def predict(self, spec: RunnerSpec, images: Images, count: int, what: str, preprocessing) -> Predictions:
        spec_ref = ray.put(self._options(spec))  # the torch module's weights go to the object store once

        def run(records) -> list:
            return self._gather([_predict_shard.options(num_cpus=self.worker_cpus).remote(spec_ref, shard)
                                 for shard in self._shards(records, preprocessing)], what)

        return predictions_of(first_decodable(images.records, count, run), count, images)

    def calibrate(self, onnx_path, tensors, images: Images, preprocessing, threads, method: str,
                  percentile: float, bins: int):
        """Two passes of shards: max |x| per shard, merged by max; then histograms over the merged maxima,
        merged by addition: the local table, bin for bin. Returns the table and the files the workers skipped."""
        from calibration.statistics import check_method, table_from

        check_method(method, bins, percentile)
        names = list(dict.fromkeys(tensors))
        shards = self._shards(images.records, preprocessing)
        if not shards:
            raise PipelineError("no calibration images: the calibration set is empty")
        source = str(onnx_path)
        first = self._gather([_shard_maxima.options(num_cpus=self.worker_cpus).remote(
            source, names, shard, self.worker_cpus) for shard in shards], f"calibrating ({method}): ranges")
        maxima = np.maximum.reduce([m for m, _, _ in first])
        count = sum(n for _, n, _ in first)
        skipped = tuple(item for _, _, part in first for item in part)
        if not count:
            raise PipelineError(f"no readable images among the {len(images.records)} calibration images")
        hists = None
        if method != "minmax":
            parts = self._gather([_shard_histograms.options(num_cpus=self.worker_cpus).remote(
                source, names, shard, self.worker_cpus, maxima, bins) for shard in shards],
                f"calibrating ({method}): histograms")
            hists = np.sum(parts, axis=0)
        return table_from(names, maxima, hists, method, percentile, bins, count), skipped

    def close(self) -> None:
        pass
