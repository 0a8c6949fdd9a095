"""The model's definition and its artifacts: model sources (``models``), the stage modules
(``stages``) and their specs (``specs``, the one stage list), torch -> ONNX -> fp16/fused ->
TensorRT (``exporter``, ``onnx_export``, ``tensorrt_build``), verification (``verify``),
the content-addressed cache (``artifacts``) and the typed manifest (``manifest``).
Imports ``kernels`` only."""
