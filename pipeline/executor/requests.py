"""What an executor is asked and what it answers: the images of a request and its predictions, and how the
results of image shards join into the answer (the same for both executors, so both give the same answer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from calibration.datasets import ImageRecord, Skipped


@dataclass(frozen=True)
class Images:
    """Images a request runs on: the selected records (what a Ray shard decodes) and how this process loads them
    (`load()` -> `pipeline.context.ImageSet`, what the local executor runs on: decoded once per build)."""

    kind: str  # "evaluation", "calibration", "gate decision": for messages and skipped-image records
    records: Sequence[ImageRecord]
    load: Callable[[], object]


@dataclass(frozen=True)
class Predictions:
    logits: np.ndarray  # (N, classes), in image order
    labels: np.ndarray  # (N,), -1 where unknown
    paths: tuple[str, ...]  # the image files, in order
    runner: str  # what ran (the runner's name)
    precision: str  # the precision that really ran
    skipped: tuple[Skipped, ...] = ()  # files met that did not decode (the Ray executor decodes per request)

    def digest(self) -> str:
        """The images' content digest (`calibration.images.records_digest` of the images that ran)."""
        from pathlib import Path

        from calibration.images import records_digest

        return records_digest(ImageRecord(Path(path), None if label < 0 else int(label))
                              for path, label in zip(self.paths, self.labels))


def first_decodable(records: Sequence[ImageRecord], count: int, run: Callable[[Sequence[ImageRecord]], list]) -> list:
    """The shard results (`work.ShardLogits`) of the first `count` records that decode, as a local run skips files:
    `run` the first `count` records, then as many more as were skipped, until `count` ran or none are left."""
    parts, kept, start = [], 0, 0
    while kept < count and start < len(records):
        batch = records[start:start + count - kept]
        start += len(batch)
        for part in run(batch):
            parts.append(part)
            kept += len(part.records)
    return parts


def predictions_of(parts: list, count: int, images: Images) -> Predictions:
    """The shard results joined in image order, cut to `count` images."""
    from calibration.datasets import labels_array
    from pipeline.errors import PipelineError

    kept = tuple(record for part in parts for record in part.records)[:count]
    if not kept:
        raise PipelineError(f"no readable images among the {len(images.records)} {images.kind} images")
    logits = np.concatenate([part.logits for part in parts if len(part.records)])[:count]
    return Predictions(logits, labels_array(kept), tuple(str(record.path) for record in kept), parts[0].runner,
                       parts[0].precision, tuple(skipped for part in parts for skipped in part.skipped))
