"""Weights on disk: the packed file format (`pack`, `pack_index`), reading ONNX external-data
fields without reading weights (`external_data`), integrity checks (`checks`), page-cache
prefetch (`prefetch`) and opening an onnxruntime session over memory-mapped weights (`mapping`).
Nothing here serves requests; `runtime/` calls `mapping` when it builds sessions."""
