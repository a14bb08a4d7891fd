"""INT8 post-training quantization: calibration frames, onnxruntime calibration into Q/DQ ONNX, which head nodes
stay in float, and a structural TensorRT acceptance check."""
