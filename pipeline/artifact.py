"""The deployable bundle every build leaves in `build/<model>/<target>/bundle/`, and its reader.

A bundle is self-describing: `manifest.json` names the model files per precision, the
preprocessing, the golden data (uint8 crops, labels, torch FP32 reference logits), the drift budget
per precision, and the accuracy measured on the host. Device-side commands (`device-build`,
`verify`) and the camera runtime read bundles through `Bundle.open` only, so this module imports
nothing but numpy and the standard library, and runs on Python 3.10 (JetPack 6).

Layout (paths relative to the bundle folder; the manifest is written last, as the completion marker):

    manifest.json            format BUNDLE_FORMAT, see `Bundle`
    labels.txt               one class name per line
    README.md                what the bundle is and how to use it on the device
    calibration.json         INT8 builds: the version-neutral calibration table
    models/                  fp32.onnx, fp16.onnx, int8_qdq.onnx, int8_qdq_fp16.onnx,
                             int8_qdq_fallback.onnx (GPU targets); model.xml + model.bin (CPU target)
    golden/inputs_uint8.npy  N x H x W x 3 RGB uint8 crops (resize + center crop, before normalisation)
    golden/labels.npy        N int64 class indices, -1 where unknown
    golden/reference_logits.npy   N x C float32, torch FP32
    golden/intermediates.npz GPU targets: FP32 ONNX values of marked intermediate tensors (first images)
    trtexec.txt              GPU targets: equivalent trtexec command lines
    wheel/*.whl              the project's own wheel, for an offline install
    engines/                 written on the device by device-build (never by the host)
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.integrity import check_bundle_files, sha256_file  # noqa: F401  (sha256_file: one SHA-256 for stage files and bundles)

BUNDLE_FORMAT = "inception-edge-bundle/1"
MANIFEST = "manifest.json"
BUNDLE_DIR = "bundle"
BUNDLE_ARCHIVE = "bundle.tar.gz"
GOLDEN_INPUTS = "golden/inputs_uint8.npy"
GOLDEN_LABELS = "golden/labels.npy"
GOLDEN_REFERENCE = "golden/reference_logits.npy"
GOLDEN_INTERMEDIATES = "golden/intermediates.npz"
ENGINES_DIR = "engines"
EXTRACTED_FROM = ".extracted-from.json"  # which bundle.tar.gz (name, size, mtime) the folder beside it came from


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle.

    `manifest` keys (all written by `pipeline.stages.bundle`):
      format, pipeline_version, model, target ("cpu" | "jetson" | "desktop-gpu"), precision (deployed:
      "int8" | "fp16" | "fp32"), random_weights (bool), labelled (bool),
      input {name, layout "NCHW", size, dtype "float32"}, output {name, classes},
      preprocessing {crop, resize, crop_pct, interpolation, mean, std} (as calibration.Preprocessing): what the
        models take, RGB in 0..1 NCHW; model_input {layout, channels, scale, mean, std}: what the network itself
        takes, for the record (folded into the models; nothing on the device reads it),
      labels "labels.txt",
      golden {images, inputs, labels, reference, intermediates (or null)},
      artifacts {precision: {file, kind "onnx" | "openvino", ...}}: GPU int8 also has strongly_typed,
        fallback, calibration; CPU has inference_precision,
      budgets {precision: DriftBudget.as_dict()}: what the device is judged on,
      expected {precision: {top1, top5, agreement, images, source, host_proxy}} measured on the host,
      tolerance {precision: {max_abs}}: ONNX Runtime on the host reproduces the golden logits within it,
      tensorrt {min_batch, opt_batch, max_batch, workspace_mib, dla_core, timing_cache} (GPU targets),
      trtexec [command lines], wheel (file name or null), host {...}, files {relative path: sha256},
      sizes {relative path: bytes} (checked on every open; see `pipeline.integrity`).
    """

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | os.PathLike, check_hashes: bool = True) -> Bundle:
        """Open a bundle folder, a build folder holding `bundle/`, or a `bundle.tar.gz` (extracted beside it)."""
        path = Path(path)
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            path = extract_archive(path)
        elif path.is_dir() and (path / BUNDLE_DIR / MANIFEST).is_file():  # a build folder (a bundle never holds bundle/)
            path = path / BUNDLE_DIR
        if not path.exists():
            raise PipelineError(f"{path}: no such bundle (give a bundle folder, its build folder, or bundle.tar.gz)")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise PipelineError(f"{path}: not a bundle ({MANIFEST} missing): give build/<model>/<target>/bundle or its .tar.gz")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise PipelineError(f"{manifest_path}: unreadable bundle manifest ({error}): copy the bundle again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise PipelineError(f"{manifest_path}: bundle format {found!r}, this version reads {BUNDLE_FORMAT!r}: "
                                "rebuild the bundle with this version of the pipeline")
        bundle = cls(path, manifest)
        bundle.check_files(hashes=check_hashes)
        return bundle

    def check_files(self, hashes: bool = True) -> None:
        """Every file the manifest lists exists with its size (and sha256): a clear error otherwise."""
        check_bundle_files(self.root, self.manifest, hashes=hashes)

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def artifact(self, precision: str | None = None) -> dict:
        precision = precision or self.precision
        artifacts = self.manifest.get("artifacts", {})
        if precision not in artifacts:
            raise PipelineError(f"{self.root}: the bundle has no {precision} model (it has: {', '.join(artifacts) or 'none'})")
        return artifacts[precision]

    def labels(self) -> list[str]:
        return [line.strip() for line in self.path(self.manifest.get("labels", "labels.txt")).read_text().splitlines() if line.strip()]

    def golden(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Golden (uint8 crops N x H x W x 3, labels N, reference logits N x C)."""
        golden = self.manifest["golden"]
        return (np.load(self.path(golden["inputs"])), np.load(self.path(golden["labels"])),
                np.load(self.path(golden["reference"])))

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 crops -> float32 NCHW network input, with the bundle's mean/std."""
        pre = self.manifest["preprocessing"]
        x = crops.astype(np.float32) / 255.0
        x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def extract_archive(archive: Path) -> Path:
    """Extract `bundle.tar.gz` next to itself (once) and return the bundle folder.

    Only plain files and folders inside the target are accepted (a bundle has nothing else): an absolute
    path, a `..`, a link or a device file is refused before anything is written. Extraction goes to a
    temporary folder that is renamed into place, so a corrupt archive leaves nothing behind.
    """
    target = archive.parent / archive.name.replace(".tar.gz", "").replace(".tgz", "")
    if (target / MANIFEST).is_file():
        return _extracted_from(archive, target)
    if target.exists():
        raise PipelineError(f"{target}: exists but is not a bundle ({MANIFEST} missing): remove it, then open {archive} again")
    partial = target.with_name(f".{target.name}.extracting")
    shutil.rmtree(partial, ignore_errors=True)  # left by an extraction that was killed
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the standard library's own guard too
                tar.extractall(partial, filter="data")
            else:
                tar.extractall(partial)
        inner = list(partial.iterdir())
        source = inner[0] if len(inner) == 1 and inner[0].is_dir() else partial
        if not (source / MANIFEST).is_file():
            raise PipelineError(f"{archive}: not a bundle archive (no {MANIFEST} inside): copy bundle.tar.gz again")
        os.replace(source, target)
        _remember_archive(archive, target)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"{archive}: corrupt or unreadable bundle archive ({_one_line(error)}): copy it again") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _archive_identity(archive: Path) -> dict:
    stat = archive.stat()
    return {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _remember_archive(archive: Path, target: Path) -> None:
    """Note which archive the folder came from, so that a newer archive copied over it is not missed."""
    try:
        (target / EXTRACTED_FROM).write_text(json.dumps(_archive_identity(archive)))
    except OSError:  # a read-only folder: the manifests are compared on every open instead
        pass


def _extracted_from(archive: Path, target: Path) -> Path:
    """The folder beside `archive`, if it holds that archive's bundle: an older bundle left there by a previous
    copy is refused rather than run in the new one's place (the folder may hold engines built on the device,
    so it is never replaced silently)."""
    try:
        if json.loads((target / EXTRACTED_FROM).read_text()) == _archive_identity(archive):
            return target
    except (OSError, ValueError):
        pass  # extracted by hand (tar xzf), or by an older version: compare the bundles' manifests
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = next((m for m in tar if m.isfile() and Path(m.name).parts[-1:] == (MANIFEST,)
                           and len(Path(m.name).parts) <= 2), None)
            inside = tar.extractfile(member).read() if member is not None else None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"{archive}: corrupt or unreadable bundle archive ({_one_line(error)}): copy it again") from None
    if inside != (target / MANIFEST).read_bytes():
        raise PipelineError(f"{target}: holds another bundle than {archive} (their manifests differ): move or remove "
                            f"{target}, then open {archive} again (or open the folder itself to use the bundle it holds)")
    _remember_archive(archive, target)
    return target


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    parts = Path(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise PipelineError(f"{archive}: refused: {member.name!r} would be written outside the bundle folder "
                            "(a bundle never has such paths): do not open this archive")
    if not (member.isfile() or member.isdir()):
        raise PipelineError(f"{archive}: refused: {member.name!r} is a link or special file "
                            "(a bundle holds plain files only): do not open this archive")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
