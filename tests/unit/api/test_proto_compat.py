"""Wire compatibility of proto/ with Triton's published protocol.

tritonclient ships the protocol's compiled descriptors; comparing ours with them field by field
(name, number, type, label, referenced type, oneof, map entry; enum values; RPC signatures and
streaming flags) proves that tritonclient and perf_analyzer read and write the same bytes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pb2 import DescriptorProto as MessageProto
from google.protobuf.descriptor_pb2 import EnumDescriptorProto as EnumProto
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as FieldProto
from google.protobuf.descriptor_pb2 import FileDescriptorProto as FileProto
from packaging.requirements import Requirement
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from pipeserve.api.generated import (
    POOL,
    grpc_service_pb2,
    health_pb2,
    health_pb2_grpc,
    model_config_pb2,
)


def _file_proto(file: FileDescriptor) -> FileProto:
    proto = FileProto()
    file.CopyToProto(proto)
    return proto


def _messages(prefix: str, messages: list[MessageProto]) -> Iterator[tuple[str, MessageProto]]:
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from _messages(full_name, list(message.nested_type))


def _enums(prefix: str, file: FileProto) -> Iterator[tuple[str, EnumProto]]:
    for enum in file.enum_type:
        yield f"{prefix}.{enum.name}", enum
    for full_name, message in _messages(prefix, list(file.message_type)):
        for enum in message.enum_type:
            yield f"{full_name}.{enum.name}", enum


def _field_signature(message: MessageProto, field: FieldProto) -> dict[str, object]:
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return {
        "number": field.number,
        "type": FieldProto.Type.Name(field.type),
        "label": FieldProto.Label.Name(field.label),
        "type_name": field.type_name,
        "oneof": oneof,
        "proto3_optional": field.proto3_optional,
    }


def _compare_names(what: str, ours: set[str], theirs: set[str]) -> list[str]:
    diffs = [f"{what} missing from ours: {name}" for name in sorted(theirs - ours)]
    diffs += [f"{what} not in Triton's: {name}" for name in sorted(ours - theirs)]
    return diffs


def descriptor_differences(ours: FileProto, theirs: FileProto) -> list[str]:
    """Every wire-relevant difference between two files, as readable lines (empty if none)."""
    diffs: list[str] = []
    if ours.package != theirs.package:
        diffs.append(f"package: ours {ours.package!r}, Triton's {theirs.package!r}")
    if ours.syntax != theirs.syntax:
        diffs.append(f"syntax: ours {ours.syntax!r}, Triton's {theirs.syntax!r}")
    prefix = "." + theirs.package

    our_messages = dict(_messages(prefix, list(ours.message_type)))
    their_messages = dict(_messages(prefix, list(theirs.message_type)))
    diffs += _compare_names("message", set(our_messages), set(their_messages))
    for name in sorted(set(our_messages) & set(their_messages)):
        our_msg, their_msg = our_messages[name], their_messages[name]
        if our_msg.options.map_entry != their_msg.options.map_entry:
            diffs.append(f"{name}: map_entry ours {our_msg.options.map_entry}, Triton's not")
        diffs += _compare_names(
            f"{name} oneof",
            {o.name for o in our_msg.oneof_decl},
            {o.name for o in their_msg.oneof_decl},
        )
        our_fields = {f.name: _field_signature(our_msg, f) for f in our_msg.field}
        their_fields = {f.name: _field_signature(their_msg, f) for f in their_msg.field}
        diffs += _compare_names(f"{name} field", set(our_fields), set(their_fields))
        for field in sorted(set(our_fields) & set(their_fields)):
            for key, theirs_value in their_fields[field].items():
                ours_value = our_fields[field][key]
                if ours_value != theirs_value:
                    diffs.append(
                        f"{name}.{field} {key}: ours {ours_value!r}, Triton's {theirs_value!r}"
                    )

    our_enums = dict(_enums(prefix, ours))
    their_enums = dict(_enums(prefix, theirs))
    diffs += _compare_names("enum", set(our_enums), set(their_enums))
    for name in sorted(set(our_enums) & set(their_enums)):
        our_values = {v.name: v.number for v in our_enums[name].value}
        their_values = {v.name: v.number for v in their_enums[name].value}
        if our_values != their_values:
            diffs.append(f"enum {name} values: ours {our_values}, Triton's {their_values}")

    our_services = {s.name: s for s in ours.service}
    their_services = {s.name: s for s in theirs.service}
    diffs += _compare_names("service", set(our_services), set(their_services))
    for service in sorted(set(our_services) & set(their_services)):
        our_rpcs = {m.name: m for m in our_services[service].method}
        their_rpcs = {m.name: m for m in their_services[service].method}
        diffs += _compare_names(f"{service} rpc", set(our_rpcs), set(their_rpcs))
        for rpc in sorted(set(our_rpcs) & set(their_rpcs)):
            for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                ours_value = getattr(our_rpcs[rpc], key)
                theirs_value = getattr(their_rpcs[rpc], key)
                if ours_value != theirs_value:
                    diffs.append(
                        f"{service}.{rpc} {key}: ours {ours_value!r}, Triton's {theirs_value!r}"
                    )
    return diffs


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (model_config_pb2.DESCRIPTOR, triton_model_config_pb2.DESCRIPTOR),
        (grpc_service_pb2.DESCRIPTOR, triton_service_pb2.DESCRIPTOR),
    ],
    ids=["model_config", "grpc_service"],
)
def test_matches_triton_descriptors(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    differences = descriptor_differences(_file_proto(ours), _file_proto(theirs))
    assert differences == [], "\n".join(differences)


def test_service_has_all_twenty_rpcs() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert len(service.methods) == 20
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


# Each mutation breaks one wire-relevant property of our grpc_service.proto copy; the comparison
# must name it. This keeps descriptor_differences honest: a checker that misses a renumbered
# field would pass the real comparison above vacuously.
def _renumber_field(proto: FileProto) -> None:
    _message(proto, "ModelInferRequest").field[0].number = 99


def _change_label(proto: FileProto) -> None:
    field = _message(proto, "ModelInferRequest").field[0]
    field.label = FieldProto.LABEL_REPEATED


def _change_type(proto: FileProto) -> None:
    field = _message(proto, "ModelInferRequest").field[0]
    field.type = FieldProto.TYPE_BYTES


def _retarget_message_field(proto: FileProto) -> None:
    response = _message(proto, "ModelConfigResponse")
    response.field[0].type_name = ".inference.ModelInput"


def _leave_oneof(proto: FileProto) -> None:
    _message(proto, "InferParameter").field[0].ClearField("oneof_index")


def _add_top_level_enum(proto: FileProto) -> None:
    proto.enum_type.add(name="Extra").value.add(name="EXTRA_ZERO", number=0)


def _drop_streaming(proto: FileProto) -> None:
    for method in proto.service[0].method:
        if method.name == "ModelStreamInfer":
            method.client_streaming = False


def _rename_nested_message(proto: FileProto) -> None:
    _message(proto, "ModelInferRequest").nested_type[0].name = "InputTensor"


def _message(proto: FileProto, name: str) -> MessageProto:
    return next(m for m in proto.message_type if m.name == name)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_renumber_field, "ModelInferRequest.model_name number: ours 99, Triton's 1"),
        (_change_label, "ModelInferRequest.model_name label"),
        (_change_type, "ModelInferRequest.model_name type: ours 'TYPE_BYTES'"),
        (_retarget_message_field, "ModelConfigResponse.config type_name"),
        (_leave_oneof, "InferParameter.bool_param oneof: ours None, Triton's 'parameter_choice'"),
        (_add_top_level_enum, "enum not in Triton's: .inference.Extra"),
        (_drop_streaming, "GRPCInferenceService.ModelStreamInfer client_streaming"),
        (_rename_nested_message, "message missing from ours: .inference.ModelInferRequest.Infer"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_comparison_detects(mutate: Callable[[FileProto], None], expected: str) -> None:
    ours = _file_proto(grpc_service_pb2.DESCRIPTOR)
    mutate(ours)
    differences = descriptor_differences(ours, _file_proto(triton_service_pb2.DESCRIPTOR))
    assert any(expected in line for line in differences), "\n".join(differences)


def test_model_config_enum_value_change_is_detected() -> None:
    ours = _file_proto(model_config_pb2.DESCRIPTOR)
    data_type = next(e for e in ours.enum_type if e.name == "DataType")
    data_type.value[1].number = 42
    differences = descriptor_differences(ours, _file_proto(triton_model_config_pb2.DESCRIPTOR))
    assert any(line.startswith("enum .inference.DataType values") for line in differences)


def test_health_protocol_matches_grpc_health_v1() -> None:
    # Expected values from gRPC's published grpc/health/v1/health.proto.
    file = health_pb2.DESCRIPTOR
    assert file.package == "grpc.health.v1"
    request = file.message_types_by_name["HealthCheckRequest"]
    assert [(f.name, f.number, f.type) for f in request.fields] == [
        ("service", 1, request.fields[0].TYPE_STRING)
    ]
    response = file.message_types_by_name["HealthCheckResponse"]
    status = response.fields_by_name["status"]
    assert (status.number, status.enum_type.full_name) == (
        1,
        "grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    assert {v.name: v.number for v in status.enum_type.values} == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
        "SERVICE_UNKNOWN": 3,
    }
    service = file.services_by_name["Health"]
    rpcs = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert rpcs == {
        "Check": ("HealthCheckRequest", "HealthCheckResponse", False, False),
        "Watch": ("HealthCheckRequest", "HealthCheckResponse", False, True),
    }
    assert hasattr(health_pb2_grpc, "add_HealthServicer_to_server")


def test_messages_cross_the_wire_both_ways() -> None:
    request = grpc_service_pb2.ModelInferRequest(model_name="m", model_version="2", id="r")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tensor.parameters["binary_data_size"].int64_param = 24
    request.raw_input_contents.append(b"\0" * 24)
    decoded = triton_service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.inputs[0].shape == [2, 3]
    assert decoded.inputs[0].parameters["binary_data_size"].int64_param == 24

    config = triton_model_config_pb2.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="x", data_type=triton_model_config_pb2.TYPE_FP32, dims=[-1])
    ours = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    assert ours.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(ours.input[0].dims) == [-1]


def test_descriptors_live_in_private_pool() -> None:
    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert POOL is not descriptor_pool.Default()
    assert grpc_service_pb2.ModelInferRequest is not triton_service_pb2.ModelInferRequest


_IMPORT_GENERATED = (
    "from pipeserve.api.generated import grpc_service_pb2, grpc_service_pb2_grpc, "
    "health_pb2, health_pb2_grpc, model_config_pb2"
)
_IMPORT_TRITON = "import tritonclient.grpc, tritonclient.grpc.aio"


@pytest.mark.parametrize(
    "statements",
    [[_IMPORT_TRITON, _IMPORT_GENERATED], [_IMPORT_GENERATED, _IMPORT_TRITON]],
    ids=["tritonclient_first", "pipeserve_first"],
)
def test_coexists_with_tritonclient_in_one_process(statements: list[str]) -> None:
    # A fresh interpreter: in this one both are already imported, so order would not matter.
    code = "; ".join(
        [*statements, "m = grpc_service_pb2.ModelInferRequest(model_name='x')", "print('ok')"]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


_GENERATED_DIR = Path(model_config_pb2.__file__).parent
_RUNTIME_CHECK = re.compile(
    r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
    r"(\d+),\s*(\d+),\s*(\d+),"
)


def _gencode_versions() -> set[tuple[int, int, int]]:
    found = set()
    for path in sorted(_GENERATED_DIR.glob("*_pb2.py")):
        match = _RUNTIME_CHECK.search(path.read_text())
        assert match is not None, f"{path.name}: no runtime version check found"
        found.add((int(match[1]), int(match[2]), int(match[3])))
    return found


def _declared_protobuf() -> Requirement:
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    return next(r for r in reqs if r.name == "protobuf")


def test_protobuf_range_is_the_one_the_generated_code_accepts() -> None:
    # The generated modules refuse runtimes older than the protoc that made them, and protobuf's
    # cross-version guarantee covers code of major V on runtimes V and V+1. pyproject must say
    # exactly that: a floor higher than needed excludes tritonclient releases (2.73 pins
    # protobuf <7), a lower one lets pip install a runtime that dies at import.
    versions = _gencode_versions()
    assert len(versions) == 1, f"generated files disagree on their protoc: {versions}"
    ((major, minor, patch),) = versions
    spec = {(s.operator, s.version) for s in _declared_protobuf().specifier}
    assert spec == {(">=", f"{major}.{minor}.{patch}"), ("<", str(major + 2))}


def test_protobuf_range_allows_tritonclient_2_41_and_the_newest() -> None:
    # tritonclient 2.41 takes any protobuf; the newest release (2.73) pins >=6.30,<7 and its own
    # generated code needs 6.33.5. Versions inside both: the floor check above must keep them.
    spec = _declared_protobuf().specifier
    assert spec.contains("6.33.5") and spec.contains("6.33.6")
    assert spec.contains(version("protobuf")), "the installed runtime is outside the range"
