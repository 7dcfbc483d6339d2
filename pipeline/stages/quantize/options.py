"""The options of `write_qdq_model` a build's configuration resolves to: the gate, the bundle's fallback
variant and the quantize stage's cache key all take them from here, so they describe the same model."""

from __future__ import annotations


def qdq_options(config) -> dict:
    from pipeline.stages.quantize.overflow import overflow_fix
    from pipeline.stages.quantize.unsigned import unsigned_activations

    q = config.quantization
    return {"residual_adds": q.residual_adds, "int8_head": q.int8_head, "unsigned": unsigned_activations(config),
            "overflow_fix": overflow_fix(config)}
