"""pipeserve: a real-time inference server for ONNX models (KServe v2 / Triton gRPC protocol)."""

__version__ = "0.1.0"
