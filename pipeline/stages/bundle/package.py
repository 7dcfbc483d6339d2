"""The bundle's packaging: the project's wheel (so the device installs the same code), the trtexec lines
and README a device user reads, the source digest that keys the stage, and the bundle.tar.gz archive."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.artifact import MANIFEST
from pipeline.errors import PipelineError
from targets.tensorrt.device_info import CUDA_PYTHON_CUDA13, CUDA_PYTHON_JETPACK6

TRTEXEC = "trtexec.txt"
WHEEL_DIR = "wheel"
# Sources of the project that go into its wheel: their digest is part of the bundle stage's key.
SOURCE_PACKAGES = ("pipeline", "calibration", "targets")
SOURCE_FILES = ("pyproject.toml", "README.md")


def project_root() -> Path | None:
    """The source tree holding pyproject.toml above the `pipeline` package; None for an installed package."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _source_files(root: Path) -> list[Path]:
    files = [root / name for name in SOURCE_FILES if (root / name).is_file()]
    for package in SOURCE_PACKAGES:
        files += sorted(p for p in (root / package).rglob("*")  # what setuptools packs: modules, package data
                        if p.is_file() and p.suffix in (".py", ".yaml", ".txt") and "__pycache__" not in p.parts
                        and not p.name.startswith("."))
    return files


def project_source_digest() -> str:
    """SHA-256 over the project's source files (the wheel's content); "installed" outside a source tree."""
    root = project_root()
    if root is None:
        return "installed"
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tensorrt_options(config) -> dict:
    trt = config.tensorrt
    return {"min_batch": trt.min_batch, "opt_batch": trt.opt_batch, "max_batch": trt.max_batch,
            "workspace_mib": trt.workspace_mib, "dla_core": trt.dla_core, "dla_batch": trt.dla_batch,
            "min_dla_layers": trt.min_dla_layers, "timing_cache": trt.timing_cache}


def trtexec_lines(manifest: dict) -> tuple[list[str], str]:
    try:
        from targets.tensorrt.trtexec import command_lines
    except ImportError as error:
        return [], f"targets.tensorrt.trtexec is not available ({error}): no trtexec lines"
    return list(command_lines(manifest)), ""


def write_wheel(target: Path) -> tuple[str | None, str]:
    """Build the project's wheel into `target` from a copy of its source tree (the tree stays clean)."""
    root = project_root()
    if root is None:
        return None, "the pipeline package is not installed from a source tree: no wheel"
    with tempfile.TemporaryDirectory(prefix="bundle-wheel-") as scratch:
        source = Path(scratch) / "src"
        for path in _source_files(root):
            copy = source / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
        out = Path(scratch) / "dist"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                   "-q", "-w", str(out), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise PipelineError(f"cannot build the project's wheel for the bundle ({last}): install pip, setuptools "
                                "and wheel in the build environment, or set bundle.include_wheel: false")
        target.mkdir()
        shutil.copyfile(wheels[0], target / wheels[0].name)
        return f"{WHEEL_DIR}/{wheels[0].name}", ""


def distribution_version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def write_archive(bundle_dir: Path, archive: Path) -> Path:
    """`bundle.tar.gz` of the bundle folder (its files under `bundle/`), written to a temp name then renamed."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    # The manifest's files only: not the cache's stage.json, nor engines/ or results/ that a device-build
    # on this machine may have added.
    members = list(manifest["files"]) + [MANIFEST]
    handle, temporary = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.close(handle)
    try:
        with tarfile.open(temporary, "w:gz") as tar:
            for relative in members:
                tar.add(bundle_dir / relative, arcname=f"{bundle_dir.name}/{relative}")
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the archive is meant to be copied and shared
        os.replace(temporary, archive)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return archive


def readme(manifest: dict) -> str:
    gpu = manifest["target"] != "cpu"
    lines = [
        f"# {manifest['model']} for {manifest['target']} ({manifest['precision']})",
        "",
        "A self-verifying bundle written by the inception-edge pipeline: the models, the golden data (uint8 crops",
        "of the first evaluation images, their labels and the torch FP32 reference logits), the drift budget per",
        "precision, the accuracy measured on the build host (`manifest.json` -> `expected`), and the pipeline's",
        "own wheel for an offline install. `manifest.json` lists every file with its sha256.",
        "",
        "## Contents",
        "",
    ]
    for precision, artifact in manifest["artifacts"].items():
        lines.append(f"- {precision}: `{artifact['file']}` ({artifact['kind']})")
    lines += ["- `golden/`: inputs, labels, reference logits" + (", intermediate tensors" if gpu else ""),
              "- `labels.txt`: one class name per line"]
    if manifest.get("calibration"):
        lines.append("- `calibration.json`: the version-neutral INT8 calibration table (amax per tensor)")
    if manifest.get("trtexec"):
        lines.append("- `trtexec.txt`: the equivalent trtexec command lines")
    wheel = manifest.get("wheel")
    lines += ["", "## On the device", ""]
    install = f"pip install {wheel}" if wheel else "pip install <the pipeline's wheel>"
    if gpu:
        lines += [
            "TensorRT engines are tied to the GPU and the TensorRT version: they are built here, on the device.",
            "",
            "```sh",
            "python3 -m venv --system-site-packages ~/edge-venv   # JetPack's TensorRT bindings stay visible",
            ". ~/edge-venv/bin/activate",
            f"{install}",
            f"pip install '{CUDA_PYTHON_JETPACK6}'   # JetPack 6 (CUDA 12.6, Python 3.10); CUDA 13: '{CUDA_PYTHON_CUDA13}'",
            "python -m pipeline device-check .        # preflight: TensorRT, CUDA, cuda-python, NumPy, DLA, disk",
            "python -m pipeline device-build .        # builds the engine, checks the golden data, times it",
            "```",
            "",
            "When the check fails, device-build names the first intermediate tensor that diverges and offers",
            "`python -m pipeline device-build . --variant fallback` (more layers in float) or `--precision fp16`.",
        ]
    else:
        lines += [
            "```sh",
            "python3 -m venv ~/edge-venv && . ~/edge-venv/bin/activate",
            f"{install} openvino",
            "python -m pipeline verify .              # runs the golden data, records the precision and ISA that ran",
            "```",
        ]
    return "\n".join(lines) + "\n"
