"""What the deployment preprocessing costs in accuracy: its own drift row in the report.

The bundle's golden crops are the reference preprocessing (PIL bicubic resize + center crop) of the
first golden images. The deployed artifact classifies those crops, and the original image files
through the runtime's path (OpenCV decode, OpenCV resize + crop, normalisation in the graph or in
numpy); the two sets of logits are compared like any stage.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.drift import DriftBudget, DriftResult, compare
from pipeline.errors import PipelineError
from pipeline.golden import load_golden
from pipeline.runtime.classifier import Classifier
from pipeline.runtime.sources import read_image

STAGE = "deployment_preprocessing"
BUDGET = DriftBudget(min_agreement=0.95)


def preprocessing_drift(bundle_dir: Path, image_paths: list[str], backend: str | None = None) -> DriftResult:
    """Deployed logits of the runtime's preprocessing of `image_paths` against those of the golden crops.

    `image_paths` are the original files of the bundle's first golden images, in order; those past
    the golden set are left out (they have no reference crop to compare with).
    """
    if not image_paths:
        raise PipelineError("preprocessing_drift needs the original files of the golden images (got none)")
    with Classifier.open(bundle_dir, backend=backend) as classifier:
        crops, labels, _ = load_golden(classifier.bundle)
        count = min(len(image_paths), len(crops))  # images past the golden set have no reference crop
        reference = classifier.logits_of_crops(crops[:count], rgb=True)
        deployed = classifier.logits([read_image(path) for path in image_paths[:count]], rgb=False)
    return compare(STAGE, reference, deployed, None if labels is None else labels[:count], BUDGET)
