"""Where a TensorRT engine first diverges from the host: the golden intermediates (block outputs the host
computed in FP32) against the same tensors from an engine that marks them, and what to try next.

Device-side: numpy only, Python 3.10.
"""

from __future__ import annotations

import numpy as np

from pipeline.artifact import Bundle
from pipeline.errors import PipelineError

DIVERGENCE_COSINE = 0.99


def first_divergence(host: dict, device: dict, order, threshold: float = DIVERGENCE_COSINE) -> tuple[str | None, dict]:
    """The first tensor (in `order`) whose cosine against the host value falls below `threshold`.

    Cosines are per image (float64, the lowest one counts); a tensor the device did not produce or that
    holds NaN/inf counts as diverged. Returns (name or None, {name: cosine or None}).
    """
    cosines: dict[str, float | None] = {}
    first = None
    for name in order:
        if name not in host:
            raise PipelineError(f"golden intermediates have no tensor {name!r}: copy the bundle again")
        cosine = None
        if name in device:
            cosine = tensor_cosine(host[name], device[name])
        cosines[name] = cosine
        if first is None and (cosine is None or not cosine >= threshold):
            first = name
    return first, cosines

def tensor_cosine(host: np.ndarray, device: np.ndarray) -> float:
    """Lowest per-image cosine of two (N, ...) arrays; NaN when the device value is not finite."""
    images = min(len(host), len(device))
    a = np.asarray(host[:images], np.float64).reshape(images, -1)
    b = np.asarray(device[:images], np.float64).reshape(images, -1)
    if a.shape != b.shape:
        raise PipelineError(f"intermediate tensor shapes differ: host {np.shape(host)}, device {np.shape(device)}")
    if not np.isfinite(b).all():
        return float("nan")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    cos = np.where(np.all(a == b, axis=1), 1.0, cos)  # identical gives exactly 1, not 0.9999999999999999
    return float(np.clip(cos, -1.0, 1.0).min())

def intermediates(bundle: Bundle) -> tuple[list[str], dict[str, np.ndarray]]:
    """(tensor order from the manifest, host FP32 values) of the golden intermediates; ([], {}) when absent."""
    entry = bundle.manifest.get("golden", {})
    file = entry.get("intermediates")
    if not file:
        return [], {}
    order = list(entry.get("intermediate_tensors") or [])
    try:
        with np.load(bundle.path(file)) as data:
            values = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise PipelineError(f"{bundle.path(file)}: cannot read the golden intermediates ({error}): copy the bundle again") from None
    return (order or list(values)), values

def failure_advice(bundle: Bundle, precision: str, variant: str, divergence: dict | None, from_qdq: bool = True) -> str:
    """Where the engine first diverges, and what to try: the host's fallback variant (Q/DQ builds) or FP16."""
    where = ""
    if divergence and divergence.get("first"):
        cosine = divergence["cosines"].get(divergence["first"])
        where = (f"first diverging tensor: {divergence['first']} (cosine "
                 f"{'not produced' if cosine is None else format(cosine, '.4f')} < {DIVERGENCE_COSINE}); ")
    elif divergence is not None:
        where = f"every marked intermediate tensor keeps cosine >= {DIVERGENCE_COSINE} (the head diverges); "
    offers = []
    fallback = (bundle.manifest.get("artifacts", {}).get("int8") or {}).get("fallback")
    if precision == "int8" and variant == "default" and fallback and from_qdq:
        offers.append(f"`python -m pipeline device-build {bundle.root} --variant fallback`")
    if precision != "fp16" and "fp16" in bundle.manifest.get("artifacts", {}):
        offers.append(f"`python -m pipeline device-build {bundle.root} --precision fp16`")
    return where + ("try " + " or ".join(offers) if offers else "rebuild the bundle on the host")
