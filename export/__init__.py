"""Export: torch -> ONNX -> TensorRT, with a content-addressed artifact cache."""
