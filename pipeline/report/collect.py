"""Reading a finished build for the report: the manifest, the stage records, logits, labels, the
evaluation images, quantize/gate.json and benchmark.json. Everything here was written by the build
(or `python -m pipeline benchmark`); nothing is recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.layout import MANIFEST

PROJECT_DIR = Path(__file__).resolve().parents[2]


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{root}: not a build folder ({MANIFEST} missing): run `python -m pipeline build` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: unreadable build manifest ({error}): rebuild with `python -m pipeline build`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise PipelineError(f"{path}: not a build manifest (no stages): rebuild with `python -m pipeline build`")
    return manifest


class Build:
    """The files of one build folder that the report reads."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.stages: dict = manifest["stages"]
        self.labels = _read_labels(root / manifest.get("labels", "labels.txt"))
        self.reference_logits = self._npy("reference/logits.npy")
        self.truth = self._npy("reference/labels.npy")
        # The drift checks tell whether labels apply (not for a fine-tuned head or unlabelled frames).
        labelled = any((stage.get("drift") or {}).get("labelled_images") for stage in self.stages.values())
        if self.truth is not None and not labelled:
            self.truth = np.full_like(self.truth, -1)
        self.image_paths = _read_lines(root / "reference" / "images.txt")

    def _npy(self, relative: str) -> np.ndarray | None:
        path = self.root / relative
        return np.load(path) if path.is_file() else None

    def logits(self, stage: str) -> np.ndarray | None:
        """A checked stage's logits: the check folder's, or the stage's own (self-checked stages)."""
        for relative in (f"check_{stage}/logits.npy", f"{stage}/logits.npy"):
            if (self.root / relative).is_file():
                return np.load(self.root / relative)
        return None

    def class_name(self, index: int) -> str:
        if 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def key(self, stage: str) -> str | None:
        return (self.stages.get(stage) or {}).get("key")


def _read_labels(path: Path) -> list[str]:
    return [line.strip() for line in _read_lines(path)]


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------
# Evaluation images (paths as the build saw them).


def existing_images(paths: list[str]) -> list[str]:
    """The evaluation images that can be read from here (paths are as the build saw them)."""
    found = []
    for path in paths:
        resolved = resolve_image(path)
        if resolved is not None:
            found.append(str(resolved))
    return found


def resolve_image(path: str) -> Path | None:
    """An image path from images.txt. Relative paths are relative to where the build ran: try the
    current folder, then IMAGENET_DIR and the project folder (the default ImageNet root is relative to it)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate if candidate.is_file() else None
    tries = []
    if os.environ.get("IMAGENET_DIR") and "val" in candidate.parts:
        tries.append(Path(os.environ["IMAGENET_DIR"], *candidate.parts[last_index(candidate.parts, "val"):]))
    tries.append(PROJECT_DIR / candidate)
    return next((found for found in tries if found.is_file()), None)


def last_index(parts: tuple[str, ...], name: str) -> int:
    return len(parts) - 1 - parts[::-1].index(name)


# ---------------------------------------------------------------------------------------------------
# What the build recorded, as report.json holds it.


def reference_summary(build: Build) -> dict:
    logits, truth = build.reference_logits, build.truth
    if logits is None:
        return {"images": 0}
    summary = {"images": int(len(logits)), "distinct_classes": int(len(np.unique(logits.argmax(1))))}
    if truth is not None and (truth >= 0).any():
        known = truth >= 0
        top5 = np.argsort(-logits[known], axis=1)[:, :5]
        summary.update(labelled_images=int(known.sum()),
                       top1=100.0 * float(np.mean(logits[known].argmax(1) == truth[known])),
                       top5=100.0 * float(np.mean(np.any(top5 == truth[known][:, None], axis=1))))
    return summary


def artifact_size(stage: dict) -> int | None:
    """Bytes of the stage's artifact and its companions (model.xml + model.bin; model.onnx + .data)."""
    artifact, files = stage.get("artifact"), stage.get("files") or {}
    if not artifact:
        return None
    stem = Path(artifact).stem
    sizes = [info.get("size", 0) for name, info in files.items() if Path(name).name.startswith(stem + ".")]
    return int(sum(sizes)) if sizes else None


def sensitivity(build: Build, missing: list) -> dict:
    path = build.root / "quantize" / "gate.json"
    if "quantize" not in build.stages:
        return {"note": "Not an INT8 build: no quantization, no per-layer sensitivity"}
    try:
        gate = json.loads(path.read_text())
    except (OSError, ValueError):
        note = f"{path} is missing or unreadable: rebuild the quantize stage"
        missing.append(f"per-layer sensitivity: {note}")
        return {"note": note}
    attempts = [{"excluded_count": a.get("excluded_count"), "passed": a.get("passed"), "figure": a.get("figure"),
                 "figure_name": (a.get("details") or {}).get("figure"),
                 "agreement": {backend: ((a.get("details") or {}).get(backend) or {}).get("agreement")
                               for backend in ("onnxruntime", "openvino")}} for a in gate.get("attempts", [])]
    return {"kept_in_float": gate.get("excluded_layers", []), "passed": gate.get("passed"),
            "decided_on": gate.get("decided_on"),
            "layers": len(gate.get("ranking", [])), "ranking": gate.get("ranking", []), "attempts": attempts}


def int8_stages(build: Build) -> list[str]:
    """Checked stages whose artifact is quantized (quantize, openvino_int8, quantize_fp16, tensorrt_int8)."""
    return [name for name, stage in build.stages.items()
            if stage.get("drift") is not None and (name.startswith("quantize") or name.endswith("int8"))]


def flips(build: Build, missing: list) -> dict:
    """Evaluation images whose top-1 differs between the FP32 reference and an INT8 stage."""
    stages = int8_stages(build)
    if not stages:
        return {"stages": [], "images": [], "note": "Not an INT8 build: no INT8 stage to compare"}
    if build.reference_logits is None:
        note = "reference/logits.npy is missing: rebuild the reference stage"
        missing.append(f"changed predictions: {note}")
        return {"stages": stages, "images": [], "note": note}
    reference = build.reference_logits.argmax(1)
    predictions = {}
    counts = {}
    for stage in stages:
        logits = build.logits(stage)
        if logits is None:
            missing.append(f"changed predictions: no logits of {stage} (check_{stage}/logits.npy): rebuild it")
            continue
        predictions[stage] = logits.argmax(1)
        counts[stage] = {"images": int(len(logits)), "changed": int(np.sum(predictions[stage] != reference[: len(logits)]))}
    changed = sorted({int(i) for stage, pred in predictions.items() for i in np.flatnonzero(pred != reference[: len(pred)])})
    if not build.image_paths:
        missing.append("thumbnails of changed predictions: reference/images.txt is missing: rebuild the reference stage")
    rows = []
    for index in changed:
        truth = int(build.truth[index]) if build.truth is not None else -1
        row = {"index": index, "image": build.image_paths[index] if index < len(build.image_paths) else None,
               "label": truth, "label_name": build.class_name(truth) if truth >= 0 else None,
               "fp32": int(reference[index]), "fp32_name": build.class_name(int(reference[index])), "int8": {}}
        for stage, pred in predictions.items():
            if index < len(pred):
                row["int8"][stage] = {"class": int(pred[index]), "name": build.class_name(int(pred[index]))}
        rows.append(row)
    return {"stages": list(predictions), "counts": counts, "images": rows}


def benchmark(build: Build, missing: list) -> dict | None:
    path = build.root / "benchmark.json"
    if not path.is_file():
        missing.append(f"benchmark table: no {path.name} in the build: run `python -m pipeline benchmark --latency "
                       f"--throughput --frame-path --model {build.manifest.get('model')}` to write it")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        missing.append(f"benchmark table: {path} is unreadable ({error}): run `python -m pipeline benchmark` again")
        return None
