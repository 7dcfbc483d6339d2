"""TensorRT back end for Jetson and desktop GPUs: engine builder, engine metadata, runner.

Everything here runs on the device (Python 3.10, JetPack 6 and later) and imports neither torch nor
onnx; `tensorrt` and cuda-python are imported inside the functions that need them, so importing this
package works on machines without TensorRT (development machines, CI).

- `builder`: which ONNX and which builder settings a TensorRT build takes (decided by the features
  the installed TensorRT module has, never by version strings), and the build itself;
- `calibration_cache`: the legacy `TRT-<version>-EntropyCalibration2` cache for DLA / implicit INT8,
  written on the device from the bundle's version-neutral calibration table;
- `hooks`: what a build hands TensorRT (logger, cache-only calibrator, timing cache) and atomic writes;
- `placement`: where an engine's layers really run, read back with TensorRT's engine inspector;
- `metadata`: what an engine was built for, kept in `model.engine.json` beside the engine;
- `runner`: a `Runner` over an engine (named numpy arrays in and out) with cuda-python memory;
- `device_info`: whether this machine can build engines, GPU and Jetson power/clock facts;
- `trtexec`: the equivalent `trtexec` command lines of a bundle, and parsing trtexec's timings.
"""
