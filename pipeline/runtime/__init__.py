"""The runtime camera applications import: `from pipeline.runtime import Classifier`.

Needs numpy, OpenCV and one back end (OpenVINO, ONNX Runtime or TensorRT); never torch, onnx or the
build code, and runs on Python 3.10.
"""

from pipeline.runtime.classifier import Classifier, Prediction

__all__ = ["Classifier", "Prediction"]
