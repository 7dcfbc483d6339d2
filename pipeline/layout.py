"""Where a build keeps what: the build folder and the files its stage folders hold.

    <build_dir>/<model>/<target>/          build_root()
        manifest.json  labels.txt  bundle.tar.gz
        <stage>/stage.json + the stage's files (model.onnx, model.xml + .bin, logits.npy, ...)
        check_<stage>/logits.npy            the drift check's run of the stage's artifact
        report/                             report.md / .json / .html

    <build_dir>/<model>/.<target>.lock      lock_file(): held by whoever writes the build folder
    <build_dir>/<model>/.<target>.lock.json holder_file(): pid, host and start time of the holder

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


def build_root(build_dir: str | Path, model: str, target: str) -> Path:
    """A build's folder: `<build_dir>/<model>/<target>` (the one place this path is spelled)."""
    return Path(build_dir) / model / target


def check_folder(stage: str) -> str:
    """The folder of a stage's drift check, beside the stage's own."""
    return f"check_{stage}"


def lock_file(root: Path) -> Path:
    """The build folder's lock, beside it (`clean` removes the folder; the lock must outlive that)."""
    return root.parent / f".{root.name}.lock"


def holder_file(root: Path) -> Path:
    """Who holds the lock: written by the holder once it has the lock, read by those who wait."""
    return root.parent / f".{root.name}.lock.json"
