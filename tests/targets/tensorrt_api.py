"""The TensorRT Python API reference lists in tests/data/tensorrt_api/, loaded as sets of names.

`names("10.3")` is every name `import tensorrt as trt` exposes in TensorRT 10.3 (`BuilderFlag.INT8`,
`ICudaEngine.num_io_tensors`, `nptype`, ...); `deprecated("10.3")` the subset marked deprecated.
"""

from __future__ import annotations

import functools
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "data" / "tensorrt_api"
VERSIONS = ("10.3", "11.1")


@functools.cache
def _read(version: str) -> tuple[frozenset[str], frozenset[str]]:
    path = FOLDER / f"tensorrt-{version}-python-api.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TensorRT {version} API list (known: {', '.join(VERSIONS)})")
    names, deprecated = set(), set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, note = line.partition(" # ")
        names.add(name.strip())
        if "deprecated" in note:
            deprecated.add(name.strip())
    return frozenset(names), frozenset(deprecated)


def names(version: str) -> frozenset[str]:
    return _read(version)[0]


def deprecated(version: str) -> frozenset[str]:
    return _read(version)[1]


def members(version: str, scope: str) -> list[str]:
    """Direct members of a class or enum: `members("10.3", "BuilderFlag")` -> ["BF16", "DEBUG", ...]."""
    prefix = scope + "."
    return sorted(n[len(prefix):] for n in names(version) if n.startswith(prefix) and "." not in n[len(prefix):])
