"""The inference back ends of the camera runtime behind one small interface, synchronous and asynchronous.

Every back end takes a batch of uint8 crops (N x S x S x 3) and returns logits (N x classes):
- OpenVINO: the crops go in as they are (uint8 NHWC BGR); PrePostProcessor puts the colour
  conversion, the float conversion and mean/std inside the compiled model. Async: AsyncInferQueue.
- ONNX Runtime and TensorRT: `Normalizer` turns the crops into float32 NCHW RGB in one numpy step.
  Async: a small thread pool (ONNX Runtime releases the GIL while it runs; TensorRT runs on its stream).

Each library is imported only inside the back end that needs it, so the runtime needs exactly one.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime.preprocess import Normalizer

BACKENDS = ("tensorrt", "openvino", "onnxruntime")
Done = Callable[[np.ndarray], None]  # receives the logits of one async batch


class Backend:
    """What the classifier needs from a back end. `wants_bgr`: the uint8 crops it takes are BGR."""

    name: str
    wants_bgr: bool = False
    max_batch: int | None = None  # None: any batch size

    def infer(self, crops: np.ndarray, rgb: bool) -> np.ndarray:
        raise NotImplementedError

    def infer_async(self, crops: np.ndarray, rgb: bool, done: Done) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _missing(library: str, install: str) -> PipelineError:
    return PipelineError(f"the {library} back end is not installed: {install}, or choose another back end")


class _ThreadedAsync:
    """Async mode by a small thread pool around a thread-safe synchronous `infer`."""

    workers = 2

    def _pool(self) -> ThreadPoolExecutor:
        if getattr(self, "_executor", None) is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            self._pending: list[Future] = []
            self._lock = threading.Lock()
        return self._executor

    def infer_async(self, crops: np.ndarray, rgb: bool, done: Done) -> None:
        future = self._pool().submit(lambda: done(self.infer(crops, rgb)))
        with self._lock:
            self._pending.append(future)

    def wait(self) -> None:
        if getattr(self, "_executor", None) is None:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises an error of the inference or of the callback

    def close(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class OpenVinoBackend(Backend):
    """An OpenVINO IR with normalisation and BGR -> RGB inside the compiled model."""

    wants_bgr = True

    def __init__(self, xml: Path, mean, std, device: str = "CPU", inference_precision: str | None = None,
                 throughput: bool = False):
        try:
            import openvino as ov
            from openvino.preprocess import ColorFormat, PrePostProcessor

            from targets.openvino import compile_ir, execution_precision, read_ir
        except ImportError:
            raise _missing("OpenVINO", "`pip install openvino`") from None
        xml = Path(xml)
        model = read_ir(xml, advice="copy the whole bundle again")
        ppp = PrePostProcessor(model)
        tensor = ppp.input().tensor()
        tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB) \
            .mean([255.0 * m for m in mean]).scale([255.0 * s for s in std])
        self.compiled = compile_ir(ppp.build(), str(xml), inference_precision,
                                   performance="THROUGHPUT" if throughput else "LATENCY", device=device)
        self.execution_precision = execution_precision(self.compiled)
        self.name = f"openvino {device} ({self.execution_precision})"
        self._request = self.compiled.create_infer_request()
        self._queue = None

    def infer(self, crops: np.ndarray, rgb: bool) -> np.ndarray:
        results = self._request.infer({0: np.ascontiguousarray(crops)}, share_inputs=True, share_outputs=False)
        return results[self.compiled.outputs[0]]

    def infer_async(self, crops: np.ndarray, rgb: bool, done: Done) -> None:
        if self._queue is None:
            from openvino import AsyncInferQueue

            self._queue = AsyncInferQueue(self.compiled, 0)  # 0: the device's optimal number of requests
            self._errors: list[BaseException] = []
            self._queue.set_callback(_openvino_finished)  # a plain function: no cycle through self
        self._queue.start_async({0: np.ascontiguousarray(crops)}, (done, self._errors))

    def wait(self) -> None:
        if self._queue is None:
            return
        self._queue.wait_all()
        if self._errors:
            error = self._errors[0]
            self._errors.clear()
            raise error

    def close(self) -> None:
        if self._queue is not None:
            self._queue.wait_all()  # never drop requests in flight
            self._queue = None


def _openvino_finished(request, userdata) -> None:
    done, errors = userdata
    try:
        done(request.get_output_tensor(0).data.copy())
    except BaseException as error:  # raised again by wait(), not lost in OpenVINO's thread
        errors.append(error)


class OnnxRuntimeBackend(_ThreadedAsync, Backend):
    """An ONNX model on ONNX Runtime (CPU, or CUDA when asked), fed by the numpy normaliser."""

    def __init__(self, onnx: Path, mean, std, device: str = "CPU", threads: int | None = None, fp16_typed: bool = False,
                 exact: bool = False):
        from targets.onnxruntime import OnnxRuntimeRunner

        onnx = Path(onnx)
        if not onnx.is_file():
            raise PipelineError(f"{onnx}: missing ONNX model: copy the whole bundle again")
        self.normalize = Normalizer(mean, std)
        self.runner = OnnxRuntimeRunner(onnx, threads, fp16_typed=fp16_typed, device=device, exact=exact)
        provider = self.runner.provider.replace("ExecutionProvider", "")
        self.name = f"onnxruntime {provider} ({onnx.name})"

    def infer(self, crops: np.ndarray, rgb: bool) -> np.ndarray:
        outputs = self.runner.run({self.runner.input_name: self.normalize(crops, rgb)})
        return outputs[self.runner.output_name].astype(np.float32, copy=False)


class TensorRtBackend(_ThreadedAsync, Backend):
    """A TensorRT engine built on this device by device-build, run by targets.tensorrt's runner.

    Async: one worker thread, so the caller preprocesses the next frames while the GPU runs this one
    (the runner holds one batch in flight on its CUDA stream).
    """

    workers = 1

    def __init__(self, engine: Path, mean, std):
        try:
            import tensorrt  # noqa: F401  (only to give the clear message below)
        except ImportError:
            raise PipelineError("TensorRT is not importable here: on Jetson create the venv with "
                                "`python3 -m venv --system-site-packages` so JetPack's TensorRT is visible, "
                                "or choose the onnxruntime back end") from None
        from targets.tensorrt.runner import TensorRtRunner

        self.normalize = Normalizer(mean, std)
        self.runner = TensorRtRunner(engine)
        self.max_batch = int(self.runner.max_shape[0])  # the engine's optimization profile
        self.name = f"{self.runner.name} ({Path(engine).parent.name})"

    def infer(self, crops: np.ndarray, rgb: bool) -> np.ndarray:
        outputs = self.runner.run({self.runner.input_name: self.normalize(crops, rgb)})
        return np.asarray(outputs[self.runner.output_name], dtype=np.float32)

    def close(self) -> None:
        super().close()
        getattr(self.runner, "close", lambda: None)()

