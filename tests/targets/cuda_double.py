"""TEST DOUBLE of cuda-python's runtime module (`cuda.bindings.runtime`): host memory only, no GPU.

It lets `targets.tensorrt.runner` run its real code path (allocate, copy, execute, copy back,
synchronize) against the TensorRT double. Every call returns cuda-python's `(error, value...)` tuple;
"device" memory is plain host memory, and copies are `memmove`s.
"""

from __future__ import annotations

import ctypes
import enum
import types


def make_cudart() -> types.SimpleNamespace:
    buffers: dict[int, ctypes.Array] = {}
    error = enum.Enum("cudaError_t", ["cudaSuccess", "cudaErrorInvalidValue"], start=0)
    ok = error.cudaSuccess

    def malloc(nbytes):
        buffer = (ctypes.c_uint8 * int(nbytes))()
        buffers[ctypes.addressof(buffer)] = buffer
        return ok, ctypes.addressof(buffer)

    def free(address):
        return (ok,) if buffers.pop(int(address), None) is not None else (error.cudaErrorInvalidValue,)

    def memcpy(dst, src, count, kind, stream):
        ctypes.memmove(int(dst), int(src), int(count))
        return (ok,)

    return types.SimpleNamespace(
        cudaError_t=error, cudaMemcpyKind=enum.Enum("cudaMemcpyKind", ["cudaMemcpyHostToDevice",
                                                                        "cudaMemcpyDeviceToHost"]),
        cudaMalloc=malloc, cudaMallocHost=malloc, cudaFree=free, cudaFreeHost=free,
        cudaStreamCreate=lambda: (ok, 1), cudaStreamDestroy=lambda s: (ok,), cudaStreamSynchronize=lambda s: (ok,),
        cudaMemcpyAsync=memcpy, cudaGetErrorString=lambda e: (ok, b"double"), buffers=buffers)
