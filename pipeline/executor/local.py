"""The local executor: every evaluation in the build's own process.

Up to `KEEP_DECODED` images (the default build's 650 and more) are decoded once per build and kept; a larger
set (`evaluation_images: all` on ImageNet's 50,000) is decoded per request, batch by batch, as a Ray worker
decodes its shard, so memory stays flat in the number of images (the logits excepted: 4 KB an image).
"""

from __future__ import annotations

from pipeline.executor.requests import Images, Predictions, first_decodable, predictions_of
from pipeline.executor.work import RunnerSpec, Shard, predict_shard

KEEP_DECODED = 4096  # 0.6 GB of 224x224 crops, 1.1 GB at 299x299


class LocalExecutor:
    kind = "local"

    def __init__(self, batch_size: int, reporter):
        self.batch_size = batch_size
        self.reporter = reporter

    def predict(self, spec: RunnerSpec, images: Images, count: int, what: str, preprocessing) -> Predictions:
        from targets.runner import close, predict

        if len(images.records) > KEEP_DECODED:
            progress = self.reporter.progress(what)

            def run(records) -> list:
                return [predict_shard(spec, Shard(tuple(records), preprocessing, self.batch_size), progress)]

            return predictions_of(first_decodable(images.records, count, run), count, images)
        loaded = images.load()
        runner = spec.open()
        try:
            logits = predict(runner, loaded.crops[:count], self.batch_size, progress=self.reporter.progress(what),
                             prepare=preprocessing.normalize)
        finally:
            close(runner)
        return Predictions(logits, loaded.labels[:len(logits)], loaded.paths[:len(logits)], runner.name,
                           getattr(runner, "execution_precision", "fp32"))

    def calibrate(self, onnx_path, tensors, images: Images, preprocessing, threads, **method):
        """The table, and no skipped files: decoding them here, the build context recorded its own."""
        from calibration.statistics import ImageBatches, collect_ranges

        batches = ImageBatches(images.load().crops, preprocessing, self.batch_size)
        return collect_ranges(onnx_path, tensors, batches, threads=threads,
                              progress=self.reporter.progress(f"calibrating ({method['method']})"), **method), ()

    def close(self) -> None:
        pass
