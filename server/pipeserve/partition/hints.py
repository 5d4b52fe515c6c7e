"""Sizes assumed for dynamic dimensions when a graph is costed. A leaf, so that
`pipeserve split --help` can show them without importing onnx or onnxruntime."""

DEFAULT_BATCH_HINT = 1  # a dynamic first (batch) dimension
DEFAULT_DIM_HINT = 8  # any other dynamic dimension
