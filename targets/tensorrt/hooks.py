"""The objects a TensorRT build hands to TensorRT: logger, cache-only calibrator, timing cache; atomic writes."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError


def attach_timing_cache(config, path: Path | None):
    """Load the persistent timing cache when there is one (an unusable one is replaced, not fatal)."""
    data = b""
    if path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # written by another TensorRT or device: start afresh, the build only gets slower
        cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
    # ignore_mismatch=False: never reuse another device's timings. TensorRT returns False when it
    # refuses the cache (another device or version wrote it): start from an empty one then.
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise PipelineError("TensorRT refused even an empty timing cache: remove tensorrt.timing_cache from the "
                                "bundle's options or report this TensorRT release")
    return cache


def cache_calibrator(trt, cache: Path):
    """An entropy calibrator with no images: TensorRT reads every scale from the legacy cache."""
    if not cache.is_file():
        raise PipelineError(f"{cache}: calibration cache not found: write it from the bundle's calibration.json")
    data = cache.read_bytes()

    class CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no images: every scale comes from the cache; a tensor without one runs in FP16

        def read_calibration_cache(self):
            return data

        def write_calibration_cache(self, cache_data):
            return None

    return CacheOnlyCalibrator()


def collecting_logger(trt):
    """TensorRT's messages on stderr as usual, errors also kept for the one-line PipelineError."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(str(message).strip())
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR, trt.ILogger.WARNING):
                print(f"[TensorRT] {message}", file=sys.stderr)

    return CollectingLogger()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
