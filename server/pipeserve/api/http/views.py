"""DataPlane answers as the JSON documents Triton's HTTP API returns.

Protobuf messages (the model config, statistics) are written the way Triton writes them
(`TRITONSERVER_MessageSerializeToJson`): proto field names, every scalar and repeated field even
when it holds its default, enums by name, and 64-bit integers as JSON numbers, not the strings of
protobuf's own JSON mapping (clients read `max_batch_size` and `dims` as numbers).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pipeserve.registry import IndexEntry
from pipeserve.serving.dataplane import (
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    VersionStatistics,
)
from pipeserve.statistics import Duration


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def message(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {str(k): _value(value_fd, v) for k, v in value.items()}
        elif _is_repeated(fd):
            out[fd.name] = [_value(fd, v) for v in value]
        elif fd.message_type is not None:
            if msg.HasField(fd.name):
                out[fd.name] = message(value)
        elif fd.containing_oneof is not None:
            if msg.WhichOneof(fd.containing_oneof.name) == fd.name:
                out[fd.name] = _value(fd, value)
        else:
            out[fd.name] = _value(fd, value)
    return out


def _is_repeated(fd: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated; `label` is deprecated there.
    repeated = getattr(fd, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)


def _value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None:
        return message(value)
    if fd.enum_type is not None:
        enum = fd.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def server_metadata(meta: ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [_tensor(t) for t in meta.inputs],
        "outputs": [_tensor(t) for t in meta.outputs],
    }


def _tensor(t: TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def statistics(versions: list[VersionStatistics]) -> dict[str, Any]:
    return {"model_stats": [_version_statistics(v) for v in versions]}


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


_ZERO = {"count": 0, "ns": 0}


def _version_statistics(v: VersionStatistics) -> dict[str, Any]:
    s = v.stats
    return {
        "name": v.name,
        "version": v.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            # No response cache in pipeserve: always zero, present because clients read them.
            "cache_hit": dict(_ZERO),
            "cache_miss": dict(_ZERO),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(s.batch_stats.items())
        ],
    }


def index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    out = []
    for e in entries:
        entry = {"name": e.name, "version": e.version, "state": e.state.value}
        if e.reason:
            entry["reason"] = e.reason
        out.append(entry)
    return out
