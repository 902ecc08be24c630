"""ONNX Runtime export: lowbit's quantized Llama as an ONNX graph with a KV cache (``llama``), its linears
as MatMulNBits / DequantizeLinear over lowbit's own codes (``linear``, ``schemes``), and a runner that
scores and decodes with ``onnxruntime`` (``runtime``). Needs the ``onnx`` extra."""
