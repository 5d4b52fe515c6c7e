"""Defaults of the packed layout `pipeserve pack` writes. A leaf, so that `pipeserve pack --help`
can show them without importing onnx or onnxruntime."""

# Every tensor in weights.bin starts at a multiple of this (64 KiB: page- and huge-page-friendly
# for mmap on every platform pipeserve runs on).
DEFAULT_ALIGNMENT = 64 << 10
# Initializers smaller than this many bytes stay inline in the graph.
DEFAULT_INLINE_BELOW = 1024
