"""Frame sources of `python -m pipeline run`: a video file, a camera index, an image folder, a GStreamer pipeline.

Every source yields (name, frame) with frame an HxWx3 uint8 BGR image as OpenCV decodes it.
A GStreamer pipeline string (it contains "!") opens with cv2.CAP_GSTREAMER, which only an OpenCV
built with GStreamer has: pip's opencv-python has none, JetPack's system OpenCV has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.preprocess import _cv2

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 BGR (greyscale expanded), EXIF orientation ignored as PIL does."""
    cv2 = _cv2()
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if frame is None:
        raise PipelineError(f"{path}: cannot read this image (missing, not an image, or damaged)")
    return frame


def has_gstreamer() -> bool:
    build = _cv2().getBuildInformation()
    return any(line.strip().startswith("GStreamer:") and "YES" in line for line in build.splitlines())


def open_source(spec: str) -> Iterator[tuple[str, np.ndarray]]:
    """The frames of `spec`; a source that does not open raises PipelineError before the first frame."""
    spec = str(spec).strip()
    if not spec:
        raise PipelineError("--source is empty: give a video file, a camera index (0), an image folder or a GStreamer pipeline")
    if "!" in spec:
        if not has_gstreamer():
            raise PipelineError("--source looks like a GStreamer pipeline, but this OpenCV was built without GStreamer "
                                "(pip's opencv-python has none): on Jetson use JetPack's system OpenCV "
                                "(a venv with --system-site-packages, without pip's opencv), or give a video file or camera index")
        return _capture(spec, gstreamer=True)
    if spec.isdigit():
        return _capture(int(spec))
    path = Path(spec)
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        return _capture(str(path))
    raise PipelineError(f"--source {spec}: no such file, folder or camera index")


def _folder(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every image under the folder, subfolders included (a camera's day folders), in path order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PipelineError(f"--source {folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def frames():
        for file in files:
            yield str(file.relative_to(folder)), read_image(file)

    return frames()


def _capture(target, gstreamer: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    cv2 = _cv2()
    capture = cv2.VideoCapture(target, cv2.CAP_GSTREAMER) if gstreamer else cv2.VideoCapture(target)
    if not capture.isOpened():
        capture.release()
        what = "camera" if isinstance(target, int) else "GStreamer pipeline" if gstreamer else "video"
        raise PipelineError(f"--source {target}: OpenCV cannot open this {what} (check the path / device "
                            "and that OpenCV has a decoder for it)")

    def frames():
        index = 0
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield f"frame {index}", frame
                index += 1
        finally:
            capture.release()

    return frames()
