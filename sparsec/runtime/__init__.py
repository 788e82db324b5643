"""onnxruntime sessions, calibration data and statistics, verification, precision, TensorRT."""
