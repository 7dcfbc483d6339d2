"""Where a build keeps what: the build folder and the files its stage folders hold.

    <build_dir>/<model>/<target>/          build_root()
        manifest.json  labels.txt  bundle.tar.gz  image-digests.json (pipeline/recorded_images.py)
        <stage>/stage.json + the stage's files (model.onnx, model.xml + .bin, logits.npy, ...)
        check_<stage>/logits.npy            the drift check's run of the stage's artifact
        report/                             report.md / .json / .html

    <build_dir>/.locks/<model>.<target>.lock       lock_file(): held by whoever writes the build folder
    <build_dir>/.locks/<model>.<target>.lock.json  holder_file(): pid, host and start time of the holder

Everything that reads or writes a build folder takes these names from here.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
LABELS = "labels.txt"
ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"
LOGITS_FILE = "logits.npy"
LABELS_FILE = "labels.npy"
IMAGES_FILE = "images.txt"  # the evaluation images, one path per line, in the order of logits.npy
TABLE_FILE = "calibration.json"
GATE_FILE = "gate.json"
IMAGE_DIGESTS = "image-digests.json"  # the image lists' digests, for rebuilds without the images


def build_root(build_dir: str | Path, model: str, target: str) -> Path:
    """A build's folder: `<build_dir>/<model>/<target>` (the one place this path is spelled)."""
    return Path(build_dir) / model / target


def check_folder(stage: str) -> str:
    """The folder of a stage's drift check, beside the stage's own."""
    return f"check_{stage}"


def lock_file(root: Path) -> Path:
    """The build folder's lock, outside it and outside `<build_dir>/<model>/`: `clean` removes the folder and a
    failed first build removes the folders it made, while the lock must outlive both."""
    return root.parent.parent / ".locks" / f"{root.parent.name}.{root.name}.lock"


def holder_file(root: Path) -> Path:
    """Who holds the lock: written by the holder once it has the lock, read by those who wait."""
    return lock_file(root).with_suffix(".lock.json")
