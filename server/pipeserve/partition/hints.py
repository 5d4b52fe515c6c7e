"""Sizes assumed for dynamic dimensions when a graph is costed, and the names of the cost units a
plan reports. A leaf, so that `pipeserve split` can use them without importing onnx or
onnxruntime up front."""

DEFAULT_BATCH_HINT = 1  # a dynamic first (batch) dimension
DEFAULT_DIM_HINT = 8  # any other dynamic dimension

# Plan.cost_unit values: measured costs make a plan that can change between runs.
PROFILED_UNIT = "us (profiled)"
ESTIMATED_UNIT = "flops (estimated)"
