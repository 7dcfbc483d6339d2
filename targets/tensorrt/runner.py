"""A `Runner` over a TensorRT engine: named numpy arrays in, every engine output out.

Engine metadata (`model.engine.json`) is read and checked against this GPU and TensorRT before the
engine is deserialized, so a stale engine gives one line saying to rebuild. Device memory and pinned
host buffers come from cuda-python (`cuda.bindings.runtime` on 12.6+/13.x, `cuda.cudart` on older
12.x), sized once for the profile's largest batch; a run sets the input shape and tensor addresses,
copies in, `execute_async_v3` on the runner's stream, copies every output back and synchronizes.
Every CUDA error becomes a PipelineError naming the call. `start` / `wait` split a run in two, so
the host can prepare the next batch while the GPU computes this one (one batch in flight per runner).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from targets.tensorrt.device_info import NO_TENSORRT, check, cudart, gpu_description
from targets.tensorrt.metadata import REBUILD, EngineMetadata, check_compatible, metadata_path
from targets.tensorrt.placement import summary

OUTPUT_NAME = "logits"


class _Buffer:
    """One tensor's device allocation and its pinned host twin, `nbytes` each."""

    def __init__(self, runtime, nbytes: int, name: str):
        self.runtime, self.nbytes = runtime, max(int(nbytes), 1)
        self.device = self.host = None
        self.device = check(runtime.cudaMalloc(self.nbytes), f"cudaMalloc({name}, {self.nbytes} bytes)")
        self.host = check(runtime.cudaMallocHost(self.nbytes), f"cudaMallocHost({name}, {self.nbytes} bytes)")

    def host_array(self, dtype, shape) -> np.ndarray:
        count = int(np.prod(shape)) if len(shape) else 1
        raw = (ctypes.c_uint8 * self.nbytes).from_address(int(self.host))
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self.runtime.cudaFree(self.device)
            self.device = None
        if self.host is not None:
            self.runtime.cudaFreeHost(self.host)
            self.host = None


class TensorRtRunner:
    """An engine built by `builder.build_engine`, run on GPU 0 (or its DLA core) with float32 I/O."""

    def __init__(self, engine_path: str | Path, name: str | None = None, check_device: bool = True):
        self.engine_path = Path(engine_path)
        self.metadata = EngineMetadata.load(metadata_path(self.engine_path))
        if not self.engine_path.is_file():
            raise PipelineError(f"{self.engine_path}: engine missing: {REBUILD}")
        try:
            import tensorrt as trt
        except ImportError:
            raise PipelineError(NO_TENSORRT) from None
        self._trt = trt
        self._runtime = cudart()
        self._buffers: dict[str, _Buffer] = {}
        self._stream = None
        self._pending: dict | None = None  # output shapes of the batch in flight
        if check_device:
            gpu = gpu_description()
            check_compatible(self.metadata, str(trt.__version__), gpu["name"], gpu["compute_capability"],
                             engine=self.engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the engine
        self._trt_runtime = trt.Runtime(self._logger)
        if self.metadata.dla_core >= 0:
            self._trt_runtime.DLA_core = self.metadata.dla_core
        self.engine = self._trt_runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise PipelineError(f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine: {REBUILD}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PipelineError(f"{self.engine_path}: cannot create an execution context (out of GPU memory?)")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if self.metadata.input_name not in self.inputs or len(self.inputs) != 1:
            raise PipelineError(f"{self.engine_path}: expected one input {self.metadata.input_name!r}, "
                                f"the engine has {self.inputs}: {REBUILD}")
        self.input_name = self.metadata.input_name
        self.output_name = OUTPUT_NAME if OUTPUT_NAME in self.outputs else self.outputs[0]
        self.execution_precision = self.metadata.precision
        self.name = name or f"tensorrt {self.metadata.precision} ({self._where()})"
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.min_shape, _, self.max_shape = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _allocate(self) -> None:
        """Buffers for the largest batch of the profile, and the stream."""
        self._stream = check(self._runtime.cudaStreamCreate(), "cudaStreamCreate")
        if not self.context.set_input_shape(self.input_name, self.max_shape):
            raise PipelineError(f"{self.engine_path}: the engine refuses its own maximum shape {self.max_shape}")
        for name in [self.input_name] + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise PipelineError(f"{self.engine_path}: output {name} has a data-dependent shape {shape}: unsupported")
            nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
            self._buffers[name] = _Buffer(self._runtime, nbytes, name)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every engine output (the logits and any marked intermediate tensor) for one batch."""
        self.start(inputs)
        return self.wait()

    def start(self, inputs: dict[str, np.ndarray]) -> None:
        """Enqueue one batch on the runner's CUDA stream and return at once (the host may prepare the next
        batch meanwhile); `wait()` gives its outputs. One batch in flight per runner: for more, open
        more runners (each has its own stream and buffers)."""
        if self._pending is not None:
            raise PipelineError(f"{self.name}: a batch is already in flight: call wait() first")
        try:
            x = inputs[self.input_name]
        except KeyError:
            raise ValueError(f"{self.name}: no input named {self.input_name!r} (got {sorted(inputs)})") from None
        x = np.ascontiguousarray(x, dtype=self.dtypes[self.input_name])
        if x.ndim != len(self.max_shape) or x.shape[1:] != tuple(self.max_shape[1:]):
            raise PipelineError(f"{self.name}: input shape {x.shape}, the engine takes (N,) + {tuple(self.max_shape[1:])}")
        if self.metadata.static_shapes and x.shape[0] != self.max_shape[0]:
            raise PipelineError(f"{self.name}: batch {x.shape[0]}, this engine takes batch {self.max_shape[0]} only "
                                "(static shapes, as DLA needs): pad the batch or build one with --dla-batch "
                                f"{x.shape[0]}")
        if not self.min_shape[0] <= x.shape[0] <= self.max_shape[0]:
            raise PipelineError(f"{self.name}: batch {x.shape[0]} outside the engine's profile "
                                f"{self.min_shape[0]}..{self.max_shape[0]}: rebuild with other tensorrt batch sizes")
        if self._stream is None:
            raise PipelineError(f"{self.name}: the runner is closed")
        rt, kinds = self._runtime, self._runtime.cudaMemcpyKind
        if not self.context.set_input_shape(self.input_name, x.shape):
            raise PipelineError(f"{self.name}: the engine refuses input shape {x.shape}")
        source = self._buffers[self.input_name]
        source.host_array(x.dtype, x.shape)[...] = x
        check(rt.cudaMemcpyAsync(source.device, source.host, x.nbytes, kinds.cudaMemcpyHostToDevice, self._stream),
              "cudaMemcpyAsync(host to device)")
        for name, buffer in self._buffers.items():
            self.context.set_tensor_address(name, int(buffer.device))
        if not self.context.execute_async_v3(int(self._stream)):
            raise PipelineError(f"{self.name}: TensorRT execute_async_v3 failed (see TensorRT's messages above)")
        shapes = {}
        for name in self.outputs:
            shapes[name] = tuple(self.context.get_tensor_shape(name))
            buffer = self._buffers[name]
            nbytes = int(np.prod(shapes[name])) * self.dtypes[name].itemsize
            check(rt.cudaMemcpyAsync(buffer.host, buffer.device, nbytes, kinds.cudaMemcpyDeviceToHost, self._stream),
                  f"cudaMemcpyAsync(device to host, {name})")
        self._pending = shapes

    def wait(self) -> dict[str, np.ndarray]:
        """The outputs of the batch `start` enqueued (synchronizes the stream)."""
        shapes, self._pending = self._pending, None
        if shapes is None:
            raise PipelineError(f"{self.name}: nothing in flight: call start() first")
        check(self._runtime.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: self._buffers[name].host_array(self.dtypes[name], shapes[name]).copy() for name in self.outputs}

    def describe(self) -> dict:
        """What really ran, for reports (the runner contract of `targets.runner`)."""
        return {"runtime": f"tensorrt {self._trt.__version__}", "device": f"{self._where()}: {self.metadata.gpu_name}",
                "execution_precision": self.execution_precision, "engine": str(self.engine_path),
                "placement": summary(self.metadata.placement, self.metadata.dla_core)}

    def _where(self) -> str:
        """Where the engine runs by its read-back placement, not by what was asked (DLA falls back silently)."""
        core, placed = self.metadata.dla_core, self.metadata.placement or {}
        if core < 0:
            return "GPU"
        if placed.get("detailed") and not placed.get("on_dla"):
            return f"GPU: nothing landed on DLA {core}"
        return f"DLA {core}"

    def close(self) -> None:
        if self._stream is not None and self._pending is not None:
            self._runtime.cudaStreamSynchronize(self._stream)  # never free buffers a copy still uses
        self._pending = None
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers = {}
        if self._stream is not None:
            self._runtime.cudaStreamDestroy(self._stream)
            self._stream = None
        self.context = None
        self.engine = None

    def __enter__(self) -> "TensorRtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
