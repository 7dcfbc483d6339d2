"""Edge-deployment compiler for the Inception-v4 / Inception-ResNet ImageNet classifiers.

Importing this package is cheap: torch, ONNX, OpenVINO and TensorRT are imported only by the
modules that need them.
"""

__version__ = "0.1.0"
