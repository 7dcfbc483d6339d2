"""The legacy TensorRT calibration cache, written on the device from the version-neutral table.

DLA on JetPack 6 (TensorRT 10.3) takes INT8 only from implicit calibration, and implicit calibration
can read its scales from a cache instead of running images. The cache is text:

    TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2
    <tensor name>: <scale as the hex of its IEEE-754 float32 bits>

with scale = amax / 127 and NV_TENSORRT_VERSION = major*1000 + minor*100 + patch up to 8.x
(8.6.1 -> 8601) and major*10000 + minor*100 + patch from 10.0 on (10.3.0 -> 100300, 10.14.1 -> 101401).
TensorRT rejects a cache whose header names another version, and the tensor names are those of the
exact ONNX it parses, so the cache is written where the engine is built, from the bundle's
`calibration.json` (format `inception-edge-calibration/1`, `{"tensors": {name: {"amax": x}}}`).
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError

TABLE_FORMAT = "inception-edge-calibration/1"
INT8_MAX = 127
ALGORITHM = "EntropyCalibration2"


def version_number(trt_version: str) -> int:
    """TensorRT's NV_TENSORRT_VERSION for a version string such as "10.3.0" or "10.13.3.9"."""
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(trt_version).strip())
    if not match:
        raise PipelineError(f"cannot read the TensorRT version {trt_version!r} (expected e.g. 10.3.0)")
    major, minor, patch = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if major >= 10:
        return major * 10000 + minor * 100 + patch
    return major * 1000 + minor * 100 + patch


def cache_header(trt_version: str) -> str:
    return f"TRT-{version_number(trt_version)}-{ALGORITHM}"


def scale_hex(scale: float) -> str:
    """The float32 bits of `scale` in hex, as TensorRT writes them (no leading zeros)."""
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def hex_scale(text: str) -> float:
    return struct.unpack(">f", struct.pack(">I", int(text, 16)))[0]


def amax_from_table(table: dict) -> dict[str, float]:
    """tensor -> amax from a loaded calibration table; PipelineError when it is not one."""
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        found = table.get("format") if isinstance(table, dict) else type(table).__name__
        raise PipelineError(f"calibration table format {found!r}, expected {TABLE_FORMAT!r}: rebuild the bundle")
    tensors = table.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise PipelineError("the calibration table has no tensors: rebuild the bundle")
    amax = {}
    for name, entry in tensors.items():
        value = entry.get("amax") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise PipelineError(f"calibration table: amax of {name!r} must be a positive number, got {value!r}: "
                                "rebuild the bundle")
        amax[name] = float(value)
    return amax


def dla_amax_from_table(table: dict) -> tuple[dict[str, float], str | None]:
    """(tensor -> amax for the DLA cache, a warning or None) from a loaded calibration table.

    A Jetson build's table has a `dla` section: every tensor DLA may run in INT8 and the links
    (`share`) that give ReLU/MaxPool/Concat neighbours one range (pipeline/stages/quantize/dla.py).
    Without it (an older bundle) the cache has the Q/DQ tensors only, and DLA runs the rest in FP16.
    """
    amax = amax_from_table(table)
    dla = table.get("dla")
    if dla is None:
        return amax, ("the calibration table has no DLA section (an older bundle): only the Conv inputs get a scale "
                      "and DLA runs every other tensor in FP16; rebuild the bundle for full INT8 on DLA")
    try:
        names, share = list(dla["tensors"]), dict(dla["share"])
        ranges = {name: amax[share.get(name, name)] for name in names}
    except (KeyError, TypeError) as error:
        raise PipelineError(f"calibration table: bad 'dla' section ({type(error).__name__}: {error}): "
                            "rebuild the bundle") from None
    return {**amax, **ranges}, None


def write_legacy_cache(amax: dict[str, float], trt_version: str, path: str | os.PathLike) -> Path:
    """Write the cache atomically; scales are amax / 127 rounded to float32."""
    path = Path(path)
    lines = [cache_header(trt_version)]
    for name, value in amax.items():
        if "\n" in name or not name:
            raise PipelineError(f"calibration table: tensor name {name!r} cannot go into a TensorRT cache")
        if not (math.isfinite(value) and value > 0):
            raise PipelineError(f"calibration table: amax of {name!r} must be a positive number, got {value!r}")
        lines.append(f"{name}: {scale_hex(value / INT8_MAX)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_legacy_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """(header, tensor -> scale) of a legacy cache."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path}: calibration cache not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: unreadable calibration cache ({error}): write it again") from None
    if not lines or not re.match(r"^TRT-\d+-\w+$", lines[0]):
        raise PipelineError(f"{path}: not a TensorRT calibration cache (no TRT-<version>-<algorithm> header)")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, separator, text = line.rpartition(": ")
        try:
            if not separator or not name:
                raise ValueError
            scales[name] = hex_scale(text.strip())
        except (ValueError, struct.error):
            raise PipelineError(f"{path}, line {number}: expected '<tensor>: <hex scale>', got {line!r}") from None
    return lines[0], scales
