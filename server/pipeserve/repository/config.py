"""config.pbtxt: parse, auto-complete from the ONNX graph (as Triton does), validate, and derive
the ModelSpec the request path uses.

The config is the `inference.ModelConfig` message (protobuf text format), so Triton repositories
load unchanged. This module uses the generated message class as a data format; it never touches
grpc.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor

from pipeserve.api.generated import model_config_pb2 as mc
from pipeserve.errors import ConfigError
from pipeserve.inference import ModelSpec, TensorSpec
from pipeserve.repository.graph import GraphIO, GraphTensor
from pipeserve.tensors import config_type_name, triton_from_config_type

ModelConfig = mc.ModelConfig

DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"


def read_config(model_dir: Path) -> ModelConfig:
    """Parse `<model_dir>/config.pbtxt`; an empty config when the file is absent."""
    path = model_dir / CONFIG_FILENAME
    if not path.exists():
        return ModelConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_config_text(text, str(path))


def parse_config_text(text: str, origin: str) -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{origin}: invalid model configuration: {exc}") from None
    return config


def parse_config_json(text: str) -> ModelConfig:
    """A `config` override as sent with RepositoryModelLoad (JSON, Triton's format)."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        reason = _as_config_writes_it(str(exc))
        raise ConfigError(f"invalid JSON model configuration override: {reason}") from None
    return config


def _json_to_proto_names(descriptor: Descriptor) -> dict[str, str]:
    """lowerCamelCase JSON name -> proto field name, for every field reachable from `descriptor`."""
    names: dict[str, str] = {}
    seen: set[str] = set()
    pending = [descriptor]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            if field.json_name != field.name:
                names[field.json_name] = field.name
            if field.message_type is not None:
                pending.append(field.message_type)
    return names


_PROTO_NAMES = _json_to_proto_names(ModelConfig.DESCRIPTOR)
_CAMEL_WORD = re.compile(r"\b[a-z][a-z0-9]*(?:[A-Z][a-z0-9]*)+\b")
_AVAILABLE = re.compile(r'\s*Available Fields\(except extensions\): "\[(.*)\]"', re.S)


def _as_config_writes_it(message: str) -> str:
    """json_format's errors name fields by their JSON names (maxBatchSize) and list the known
    ones as a Python list on a second line; config.pbtxt and Triton's JSON say max_batch_size.
    Rewrite the names and put the list on the same line."""
    message = _AVAILABLE.sub(
        lambda m: " Known fields: " + ", ".join(n.strip(" '") for n in m[1].split(",")) + ".",
        message,
    )
    return _CAMEL_WORD.sub(lambda m: _PROTO_NAMES.get(m[0], m[0]), message)


def complete_config(config: ModelConfig, name: str, graph: GraphIO) -> ModelConfig:
    """Fill what the config leaves out from the graph, the way Triton's ONNX backend does.

    - name, platform/backend, default_model_filename.
    - inputs/outputs missing from the config are added from the graph; listed ones keep their
      settings and get data_type/dims filled when left out.
    - max_batch_size: when the config lists no inputs and no outputs (full auto-complete) and
      every graph input and output has a variable first dimension, 4 with `dynamic_batching {}`.
    Returns a new message; the argument is not changed.
    """
    done = ModelConfig()
    done.CopyFrom(config)
    if done.name and done.name != name:
        raise ConfigError(
            f"model name in config '{done.name}' does not match the folder name '{name}'"
        )
    done.name = name
    if done.platform and done.platform != "onnxruntime_onnx":
        raise ConfigError(
            f"model '{name}': platform '{done.platform}' is not served, expected 'onnxruntime_onnx'"
        )
    if done.backend and done.backend != "onnxruntime":
        raise ConfigError(
            f"model '{name}': backend '{done.backend}' is not served, expected 'onnxruntime'"
        )
    done.platform = "onnxruntime_onnx"
    done.backend = "onnxruntime"
    if not done.default_model_filename:
        done.default_model_filename = DEFAULT_MODEL_FILENAME

    auto = not config.input and not config.output
    if auto and done.max_batch_size == 0 and graph.supports_batching():
        done.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not done.HasField("dynamic_batching") and not done.HasField("sequence_batching"):
            done.dynamic_batching.SetInParent()
    batch = done.max_batch_size > 0

    _complete_tensors(done.input, graph.inputs, batch, graph.overridable)
    _complete_tensors(done.output, graph.outputs, batch)
    if not done.instance_group:
        group = done.instance_group.add()
        group.count = 1
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    for i, group in enumerate(done.instance_group):
        if not group.name:
            group.name = f"{name}_{i}"
        if group.count == 0:
            group.count = 1
    return done


def _complete_tensors(  # type: ignore[no-untyped-def]
    listed, graph_tensors: tuple[GraphTensor, ...], batch: bool, only_if_listed=()
) -> None:
    """Fill `listed` from `graph_tensors`, adding those it leaves out; `only_if_listed` (the
    overridable initializers) are filled where listed, never added."""
    by_name = {t.name: t for t in graph_tensors + tuple(only_if_listed)}
    have = {t.name for t in listed}
    for tensor in listed:
        g = by_name.get(tensor.name)
        if g is None:
            continue  # reported by validate_config with the list of real names
        if tensor.data_type == mc.TYPE_INVALID:
            tensor.data_type = mc.DataType.Value(config_type_name(g.datatype))
        if not tensor.dims and not tensor.HasField("reshape"):
            _fill_dims(tensor, g, batch)
    for g in graph_tensors:
        if g.name in have:
            continue
        tensor = listed.add()
        tensor.name = g.name
        tensor.data_type = mc.DataType.Value(config_type_name(g.datatype))
        _fill_dims(tensor, g, batch)


def _fill_dims(tensor, g: GraphTensor, batch: bool) -> None:  # type: ignore[no-untyped-def]
    """The graph's dims (less the batch dimension). A tensor with none left (a scalar, or a
    batched tensor that is only its batch dimension) gets dims [1], as Triton's ONNX backend
    completes it; batched, with an empty `reshape`, so the model still gets its own rank."""
    dims = g.shape[1:] if batch else g.shape
    if dims:
        tensor.dims.extend(dims)
        return
    tensor.dims.append(1)
    if batch:
        tensor.reshape.SetInParent()


def validate_config(config: ModelConfig, graph: GraphIO) -> None:
    """Refuse a completed config that does not match the graph, with the reason."""
    name = config.name
    if config.max_batch_size < 0:
        raise ConfigError(
            f"model '{name}': max_batch_size must be >= 0, got {config.max_batch_size}"
        )
    batch = config.max_batch_size > 0
    for kind, listed, graph_tensors in (
        ("input", config.input, graph.inputs + graph.overridable),
        ("output", config.output, graph.outputs),
    ):
        by_name = {t.name: t for t in graph_tensors}
        for tensor in listed:
            g = by_name.get(tensor.name)
            if g is None:
                raise ConfigError(
                    f"model '{name}': unexpected {kind} '{tensor.name}' in config, the ONNX model "
                    f"has {kind}s {sorted(by_name)}"
                )
            datatype = triton_from_config_type(mc.DataType.Name(tensor.data_type))
            if datatype != g.datatype:
                raise ConfigError(
                    f"model '{name}': {kind} '{tensor.name}' has data_type "
                    f"{mc.DataType.Name(tensor.data_type)} in config but the ONNX model declares "
                    f"{config_type_name(g.datatype)}"
                )
            what = f"model '{name}': {kind} '{tensor.name}'"
            dims = tuple(tensor.dims)
            _check_dims(what, "dims", dims)
            reshaped = tensor.HasField("reshape")
            model_dims = tuple(tensor.reshape.shape) if reshaped else dims
            if reshaped:
                _check_reshape(what, dims, model_dims, batch)
            graph_dims = g.shape
            if batch:
                if not graph_dims or graph_dims[0] != -1:
                    raise ConfigError(
                        f"model '{name}': max_batch_size is {config.max_batch_size} but {kind} "
                        f"'{tensor.name}' has shape {list(graph_dims)} in the ONNX model; batching "
                        f"needs a variable first dimension (set max_batch_size: 0)"
                    )
                graph_dims = graph_dims[1:]
            elif not graph_dims and not reshaped:
                # A scalar in the model (or a tensor of unknown rank): Triton's ONNX backend
                # takes any dims of one element for it, and runs the model on a scalar.
                if any(d != 1 for d in dims):
                    raise ConfigError(
                        f"{what} is a scalar in the ONNX model: its dims in config must all be "
                        f"1 (one element), got {list(dims)}"
                    )
                continue
            if len(model_dims) != len(graph_dims) or any(
                gd != -1 and d != gd for d, gd in zip(model_dims, graph_dims, strict=True)
            ):
                field = "reshape" if reshaped else "dims"
                raise ConfigError(
                    f"{what} has {field} {list(model_dims)} in config but "
                    f"the ONNX model declares {list(graph_dims)}"
                    + (" (without the batch dimension)" if batch else "")
                )
    if config.HasField("dynamic_batching") and not batch:
        raise ConfigError(f"model '{name}': dynamic_batching needs max_batch_size > 0 (it is 0)")


def _check_dims(what: str, field: str, dims: tuple[int, ...]) -> None:
    if any(d < 1 and d != -1 for d in dims):
        raise ConfigError(
            f"{what}: {field} {list(dims)}: every dimension must be an integer >= 1, or -1 for "
            f"a variable-size dimension"
        )


def _check_reshape(what: str, dims: tuple[int, ...], shape: tuple[int, ...], batch: bool) -> None:
    """Triton's rules for `reshape { shape }` (the model's shape; `dims` is the API's)."""
    if not shape:
        if not batch:
            raise ConfigError(
                f"{what}: an empty reshape needs max_batch_size > 0 (without batching the "
                f"tensor would hold no data): remove the reshape, dims of 1s already feed a "
                f"scalar model tensor"
            )
        if -1 in dims or _count(dims) != 1:
            raise ConfigError(
                f"{what}: an empty reshape (the model takes one element per batch item) needs "
                f"dims of one element, got dims {list(dims)}"
            )
        return
    _check_dims(what, "reshape", shape)
    have, want = _trunks(dims), _trunks(shape)
    if len(have) != len(want):
        raise ConfigError(
            f"{what}: dims {list(dims)} and reshape {list(shape)} have different numbers of "
            f"variable-size (-1) dimensions"
        )
    if have != want:
        raise ConfigError(
            f"{what}: dims {list(dims)} and reshape {list(shape)} hold different numbers of "
            f"elements (the fixed dimensions between -1s must multiply to the same counts)"
        )


def _count(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _trunks(dims: tuple[int, ...]) -> list[int]:
    """Element counts of the runs of fixed dimensions between the -1s: [2, 4, -1, 6] -> [8, 6]."""
    counts, run = [], 1
    for d in dims:
        if d == -1:
            counts.append(run)
            run = 1
        else:
            run *= d
    counts.append(run)
    return counts


def model_spec(
    config: ModelConfig,
    version: int,
    labels: Mapping[str, tuple[str, ...]] | None = None,
    graph: GraphIO | None = None,
) -> ModelSpec:
    """`labels`: each output's classification labels (read from its label_filename). `graph`:
    the validated graph, which says which tensors are scalars in the model."""
    labels = labels or {}
    scalars = (
        {t.name for t in graph.inputs + graph.overridable + graph.outputs if not t.shape}
        if graph is not None and config.max_batch_size == 0
        else set()
    )

    def tensor(t, optional: bool = False, ragged: bool = False) -> TensorSpec:  # type: ignore[no-untyped-def]
        dims = tuple(t.dims)
        model_dims: tuple[int, ...] | None = None
        if t.HasField("reshape"):
            model_dims = tuple(t.reshape.shape)
        elif t.name in scalars and dims:
            model_dims = ()
        return TensorSpec(
            name=t.name,
            datatype=triton_from_config_type(mc.DataType.Name(t.data_type)),
            dims=dims,
            optional=optional,
            allow_ragged_batch=ragged,
            labels=labels.get(t.name, ()),
            model_dims=None if model_dims == dims else model_dims,
        )

    return ModelSpec(
        name=config.name,
        version=version,
        max_batch_size=config.max_batch_size,
        inputs=tuple(tensor(t, t.optional, t.allow_ragged_batch) for t in config.input),
        outputs=tuple(tensor(t) for t in config.output),
    )


def select_versions(config: ModelConfig, available: list[int], name: str) -> list[int]:
    """Apply version_policy (default: latest 1) to the version folders found on disk. `name`
    is the model's folder name (a config read from disk may leave its own `name` out)."""
    ordered = sorted(available)
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return ordered
    if which == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in ordered]
        if missing:
            raise ConfigError(
                f"model '{name}': version_policy asks for versions {missing} that have no "
                f"folder with {config.default_model_filename or DEFAULT_MODEL_FILENAME}"
            )
        return wanted
    count = policy.latest.num_versions if which == "latest" else 1
    if count < 1:
        raise ConfigError(f"model '{name}': version_policy latest needs num_versions >= 1")
    return ordered[-count:]


def string_parameters(config: ModelConfig) -> dict[str, str]:
    """The config's `parameters` map as key -> string value."""
    return {k: v.string_value for k, v in config.parameters.items()}


def instance_groups(config: ModelConfig) -> list[tuple[str, int, tuple[int, ...]]]:
    """(kind without KIND_, count, gpus) of each instance_group."""
    return [
        (mc.ModelInstanceGroup.Kind.Name(g.kind).removeprefix("KIND_"), g.count, tuple(g.gpus))
        for g in config.instance_group
    ]


def accelerators(config: ModelConfig) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(\"gpu\" or \"cpu\", name, parameters) of each optimization.execution_accelerators entry."""
    found = config.optimization.execution_accelerators
    return [
        (kind, a.name, tuple(sorted(a.parameters.items())))
        for kind, listed in (
            ("gpu", found.gpu_execution_accelerator),
            ("cpu", found.cpu_execution_accelerator),
        )
        for a in listed
    ]


def to_json(config: ModelConfig) -> str:
    return json_format.MessageToJson(config, preserving_proto_field_name=True)
