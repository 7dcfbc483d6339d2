"""What an engine was built for, stored as JSON beside it (`model.engine.json`), never inside it.

A TensorRT engine only runs on the GPU model and the TensorRT version that built it. Reading the
metadata before deserializing turns a mismatch into one line that says to rebuild, instead of a
TensorRT stack trace.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipeline.errors import PipelineError

FORMAT = "inception-edge-engine/1"
REBUILD = "rebuild it with `python -m pipeline device-build BUNDLE`"


def metadata_path(engine_path: Path) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


@dataclass(frozen=True)
class EngineMetadata:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    l4t_release: str | None  # "36.4.3" on Jetson, None elsewhere
    precision: str  # "int8" | "fp16" | "fp32"
    strongly_typed: bool
    input_name: str
    input_shapes: dict  # {"min": [N, C, H, W], "opt": [...], "max": [...]}
    source_onnx: str  # file name of the ONNX the engine was built from
    source_onnx_sha256: str
    dla_core: int  # -1: GPU only
    built_at: str  # UTC, ISO 8601
    pipeline_version: str
    static_shapes: bool = False  # min = opt = max (every DLA engine); False: a dynamic batch axis
    placement: dict = field(default_factory=dict)  # what the engine inspector says ran where (placement.py)
    extra: dict = field(default_factory=dict)  # flags, plan note, marked outputs, caller's fields

    def as_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(self.as_dict(), file, indent=2)
                file.write("\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EngineMetadata":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PipelineError(f"{path}: engine metadata missing: {REBUILD}") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise PipelineError(f"{path}: unreadable engine metadata ({error}): {REBUILD}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PipelineError(f"{path}: engine metadata format {found!r}, this version reads {FORMAT!r}: {REBUILD}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data and name != "extra"]
        if missing:
            raise PipelineError(f"{path}: engine metadata lacks {', '.join(missing)}: {REBUILD}")
        return cls(**{name: data[name] for name in names if name in data})


def sm(compute_capability: str) -> str:
    """"8.7" -> "sm 87", as NVIDIA names architectures."""
    return "sm " + str(compute_capability).replace(".", "")


def check_compatible(
    metadata: EngineMetadata,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine: str | os.PathLike | None = None,
) -> None:
    """One clear PipelineError when the engine was built for another GPU or TensorRT version."""
    if (metadata.tensorrt_version == trt_version and metadata.gpu_name == gpu_name
            and str(metadata.compute_capability) == str(compute_capability)):
        return
    where = f"{engine}: " if engine is not None else ""
    raise PipelineError(
        f"{where}engine built for {metadata.gpu_name} ({sm(metadata.compute_capability)}) with TensorRT "
        f"{metadata.tensorrt_version}; this is {gpu_name} ({sm(compute_capability)}) with TensorRT {trt_version}: "
        f"{REBUILD}"
    )
