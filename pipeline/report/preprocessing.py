"""The deployment preprocessing row: the deployed bundle on frames preprocessed the camera runtime's
way, against the reference crops (cached in report/cache.json under the bundle's key)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import stable_hash
from pipeline.report.cache import cached
from pipeline.report.collect import Build, existing_images
from pipeline.report.latency import first_line

PREPROCESSING_IMAGES = 64  # images the deployment preprocessing row is measured on (at most)


def preprocessing_row(build: Build, cache: dict, say, missing: list) -> dict:
    """The deployed artifact on frames preprocessed the runtime's way vs the reference crops."""
    try:
        from pipeline.runtime.evaluate import preprocessing_drift
    except ImportError:
        note = "the camera runtime's pipeline.runtime.evaluate.preprocessing_drift is not available in this checkout"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    bundle = build.root / "bundle"
    if not (bundle / "manifest.json").is_file():
        note = f"no bundle in {bundle}: rebuild with this version of `python -m pipeline build` to write it"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    paths = existing_images(build.image_paths)[:PREPROCESSING_IMAGES]
    if not paths:
        note = "reference/images.txt is missing or names no readable image: rebuild the reference stage"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}
    bundle_key = build.key("bundle") or _file_digest(bundle / "manifest.json")
    key = stable_hash([bundle_key, paths])

    def measure():
        say(f"  deployment preprocessing drift on {len(paths)} images")
        return preprocessing_drift(bundle, paths).as_dict()

    try:
        return {"drift": cached(cache, "preprocessing", key, measure), "images": len(paths)}
    except Exception as error:  # another component's failure is reported, not raised into the build
        note = f"failed: {first_line(error)}"
        missing.append(f"deployment preprocessing row: {note}")
        return {"note": note}


def _file_digest(path: Path) -> str:
    from pipeline.cache import sha256_file

    return sha256_file(path)
