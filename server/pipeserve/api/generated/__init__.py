"""Python code generated from proto/ by scripts/gen_proto.py. Do not edit the *_pb2* files.

Modules: `model_config_pb2` (inference.ModelConfig and friends), `grpc_service_pb2` and
`grpc_service_pb2_grpc` (inference.GRPCInferenceService), `health_pb2` and `health_pb2_grpc`
(grpc.health.v1.Health). Regenerate with `.venv/bin/python scripts/gen_proto.py`.

All descriptors live in `POOL`, a descriptor pool private to pipeserve, not in protobuf's
default pool: tritonclient registers the same full names (`inference.ModelConfig`, ...) there,
and keeping ours apart means importing both in one process never conflicts, whatever
tritonclient version is installed. Consequences for callers:

- Our message classes are distinct from tritonclient's even where names match; convert between
  them through bytes (`SerializeToString` / `FromString`), which is exactly the wire contract.
- Code that looks types up by name must use `POOL` (e.g. `POOL.FindMessageTypeByName(
  "inference.ModelConfig")`), never `descriptor_pool.Default()`. `text_format` and
  `json_format` work on our classes as usual.
"""

from google.protobuf import descriptor_pool

# Must be defined before any generated module is imported: each one adds its file here.
POOL = descriptor_pool.DescriptorPool()
