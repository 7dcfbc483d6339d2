"""What this machine's CPU can do for INT8, read from the kernel (/proc/cpuinfo), without loading a back end.

x86 CPUs without VNNI (AVX2; AVX-512 before VNNI) compute an INT8 convolution with VPMADDUBSW, which
multiplies uint8 activations by int8 weights and adds each pair of products into int16 with saturation:
255 * 127 * 2 = 64770 does not fit, so a convolution whose adjacent inputs and weights are both large gets
a clamped sum. ONNX Runtime (MLAS) and OpenVINO (oneDNN) both do this; a signed activation is shifted by
+128 into uint8 first, so it is always large. VNNI (VPDPBUSD, AVX-512 VNNI, AVX-VNNI, AMX) accumulates in
int32 and cannot saturate; neither can ARM's dot-product instructions.
"""

from __future__ import annotations

from pathlib import Path

# Any of these flags means an INT8 dot product that accumulates in int32 (no int16 intermediate).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The x86 feature flags of the first CPU; None where there are none (not x86, or no /proc)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def int8_pairs_saturate(flags: frozenset[str] | None = None) -> bool:
    """True where INT8 convolutions sum pairs of products in int16 (x86 with AVX2 but no VNNI)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and "avx2" in flags and not any(flag in flags for flag in VNNI_FLAGS)
