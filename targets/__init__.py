"""The back-end layer: every artifact is compiled and run through this package.

`runner` is the contract every back end keeps; `pytorch`, `onnxruntime`, `openvino` and `tensorrt`
are the back ends (each holding its compile and its run side), `nncf_quantizer` the NNCF comparison,
`timing` the timing of a runner. The targets a build can make are named here once.
"""

TARGETS = ("cpu", "jetson", "desktop-gpu")  # cpu: OpenVINO IR; the others: TensorRT engines built on the device
GPU_TARGETS = ("jetson", "desktop-gpu")
