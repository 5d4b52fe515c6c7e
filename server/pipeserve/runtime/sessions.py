"""The one way pipeserve opens an onnxruntime session: a model (a file, or a stage graph built in
memory whose weights live in a folder), a Device and a thread budget in; the session, the mapped
weights it reads and the device it really runs on out. Instances and pipeline stages both call
`open_onnx_session`, so both follow the same rules:

- device: placed by devices.place first (missing GPU -> CPU, one WARNING per model); a CUDA
  session whose provider still does not attach is reported as running on "cpu", with a WARNING.
- threads: `thread_budget` (the config's count, else devices.split_cores for CPU sessions and 1
  for CUDA ones, whose kernels run on the GPU); intra-op threads never spin, since a server
  shares its cores with the RPC path and with the other sessions.
- errors: anything onnxruntime raises becomes a ModelLoadError naming what was loaded and where.
- the model's onnxruntime settings (`OrtSettings`, read once per model by `ort_settings` from the
  parameters table and the config's `optimization` section): execution mode, memory arena and
  pattern, graph optimisation level, CUDA provider options, execution accelerators.

Execution accelerators (Triton's `optimization { execution_accelerators }`): `tensorrt` (GPU)
maps to onnxruntime's TensorRT provider with Triton's parameter names, `cuda` (GPU) to CUDA
provider options, `openvino` (CPU) to the OpenVINO provider. None of them changes what a model
computes beyond floating-point rounding, so one that cannot be used here (the provider is not in
this onnxruntime, or the model runs on the CPU) is a WARNING at load naming it and what runs
instead; a name Triton's backend does not know is refused, as Triton does.

Slow (session creation holds the GIL): call off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort

from pipeserve import parameters as table
from pipeserve.errors import ConfigError, ModelLoadError, PipeserveError
from pipeserve.runtime.devices import CPU, Device, available_providers, cuda_usable, split_cores
from pipeserve.weights.mapping import MappedWeights, open_session, open_stage_session

log = logging.getLogger(__name__)

# Triton's `optimization { graph { level } }` codes (onnxruntime backend): anything else, 0
# included, is onnxruntime's default, every optimisation.
GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# Triton's TensorRT accelerator parameters that are not onnxruntime's `trt_*` names.
_TRT_PRECISION = {"FP16": "trt_fp16_enable", "BF16": "trt_bf16_enable", "INT8": "trt_int8_enable"}
_TRT_RENAMED = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
# CUDA provider options read from top-level `parameters` (Triton's deprecated keys).
_CUDA_KEYS = (
    "cudnn_conv_algo_search",
    "gpu_mem_limit",
    "arena_extend_strategy",
    "do_copy_in_default_stream",
)


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One entry of `optimization { execution_accelerators }`."""

    kind: Literal["gpu", "cpu"]
    name: str
    parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OrtSettings:
    """A model's onnxruntime settings, the same for every session of the model."""

    parallel: bool = False  # execution_mode 1
    graph_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    mem_arena: bool | None = None  # None: onnxruntime's default
    mem_pattern: bool | None = None
    device_allocator_for_initializers: bool | None = None
    arena_shrinkage: str = ""  # RunOptions memory.enable_memory_arena_shrinkage
    cuda_options: tuple[tuple[str, str], ...] = ()
    # onnxruntime's TensorRT provider options; None: no TensorRT.
    tensorrt: tuple[tuple[str, str], ...] | None = None
    openvino: bool = False


DEFAULT_SETTINGS = OrtSettings()


def ort_settings(
    parameters: Mapping[str, str],
    graph_level: int = 0,
    accelerators: Sequence[Accelerator] = (),
    what: str = "model",
) -> OrtSettings:
    """Read a model's onnxruntime settings once, at load. Raises ConfigError for a bad value or
    an unknown accelerator; WARNS (once, naming `what`) for an accelerator that cannot be used
    here and says what runs instead."""
    cuda: dict[str, str] = {}
    for key in _CUDA_KEYS:
        value = table.read(parameters, key)
        if value is not None:
            cuda[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    tensorrt: dict[str, str] | None = None
    openvino = False
    gpu_here = cuda_usable()
    for acc in accelerators:
        name = acc.name.strip().lower()
        options = dict(acc.parameters)
        if acc.kind == "gpu" and name == "cuda":
            cuda.update(options)
            if not gpu_here:
                _cannot(what, acc, "no CUDA device here: the model runs on the CPU")
        elif acc.kind == "gpu" and name == "tensorrt":
            trt = _tensorrt_options(options, what)
            if not gpu_here:
                _cannot(what, acc, "no CUDA device here: the model runs on the CPU")
            elif "TensorrtExecutionProvider" not in available_providers():
                _cannot(what, acc, "this onnxruntime has no TensorRT provider: CUDA runs it")
            else:
                tensorrt = trt
        elif acc.kind == "cpu" and name == "openvino":
            if "OpenVINOExecutionProvider" in available_providers():
                openvino = True
            else:
                _cannot(what, acc, "this onnxruntime has no OpenVINO provider: CPU runs it")
        else:
            raise ConfigError(
                f"{what}: unknown execution accelerator '{acc.name}' in "
                f"{acc.kind}_execution_accelerator: expected "
                + ("'tensorrt' or 'cuda'" if acc.kind == "gpu" else "'openvino'")
            )
    if graph_level not in (-1, 0, 1, 2):
        log.warning(
            "%s: optimization graph level %d is not -1, 1 or 2: all onnxruntime graph "
            "optimisations run (Triton's behaviour)",
            what,
            graph_level,
        )
    shrinkage = table.read(parameters, "memory.enable_memory_arena_shrinkage", "")
    mem_arena = table.read(parameters, "enable_mem_arena")
    if mem_arena is False and "cpu:0" in shrinkage.split(";"):
        # onnxruntime accepts the session, then fails every run.
        raise ConfigError(
            f"{what}: parameter 'memory.enable_memory_arena_shrinkage' names cpu:0 but "
            f"'enable_mem_arena' turns the CPU arena off: drop one of them"
        )
    return OrtSettings(
        parallel=table.read(parameters, "execution_mode") == "parallel",
        graph_level=GRAPH_LEVELS.get(graph_level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        mem_arena=mem_arena,
        mem_pattern=table.read(parameters, "enable_mem_pattern"),
        device_allocator_for_initializers=table.read(
            parameters, "session.use_device_allocator_for_initializers"
        ),
        arena_shrinkage=shrinkage,
        cuda_options=tuple(sorted(cuda.items())),
        tensorrt=tuple(sorted(tensorrt.items())) if tensorrt is not None else None,
        openvino=openvino,
    )


def _cannot(what: str, acc: Accelerator, instead: str) -> None:
    log.warning(
        "%s: %s_execution_accelerator '%s' cannot be used: %s", what, acc.kind, acc.name, instead
    )


def _tensorrt_options(options: Mapping[str, str], what: str) -> dict[str, str]:
    """Triton's TensorRT accelerator parameters as onnxruntime's TensorRT provider options."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if key == "precision_mode":
            mode = value.strip().upper()
            if mode == "FP32":
                continue
            if mode not in _TRT_PRECISION:
                raise ConfigError(
                    f"{what}: tensorrt precision_mode '{value}': expected FP32, FP16, BF16 or INT8"
                )
            out[_TRT_PRECISION[mode]] = "True"
        elif key in _TRT_RENAMED:
            out[_TRT_RENAMED[key]] = value
        elif key.startswith("trt_"):
            out[key] = value
        else:
            raise ConfigError(
                f"{what}: unknown tensorrt accelerator parameter '{key}': expected "
                f"precision_mode, {', '.join(_TRT_RENAMED)} or an onnxruntime trt_* option"
            )
    return out


def providers_for(device: Device, settings: OrtSettings = DEFAULT_SETTINGS) -> list[Any]:
    """onnxruntime's provider list for a session of a model with `settings` on `device`."""
    providers: list[Any] = []
    if device.kind == "cuda":
        if settings.tensorrt is not None:
            trt = {"device_id": device.index, **dict(settings.tensorrt)}
            providers.append(("TensorrtExecutionProvider", trt))
        options: dict[str, Any] = {"device_id": device.index, **dict(settings.cuda_options)}
        providers.append(("CUDAExecutionProvider", options))
    if settings.openvino:
        providers.append(("OpenVINOExecutionProvider", {"device_type": "CPU"}))
    providers.append("CPUExecutionProvider")
    return providers


def session_options(threads: ThreadBudget, settings: OrtSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = threads.inter_op
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if settings.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.graph_optimization_level = settings.graph_level
    if settings.mem_arena is not None:
        options.enable_cpu_mem_arena = settings.mem_arena
    if settings.mem_pattern is not None:
        options.enable_mem_pattern = settings.mem_pattern
    if settings.device_allocator_for_initializers is not None:
        options.add_session_config_entry(
            "session.use_device_allocator_for_initializers",
            "1" if settings.device_allocator_for_initializers else "0",
        )
    options.log_severity_level = 3
    # A server shares its cores with gRPC, the event loop and the other sessions: onnxruntime's
    # intra-op threads must sleep between runs rather than spin on the cores those need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def run_options(settings: OrtSettings) -> ort.RunOptions | None:
    """Options every run of the model's sessions passes (None: onnxruntime's defaults)."""
    if not settings.arena_shrinkage:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", settings.arena_shrinkage)
    return options


@dataclass(frozen=True, slots=True)
class ThreadBudget:
    intra_op: int
    inter_op: int = 1


def thread_budget(
    device: Device,
    cpu_sessions: int,
    intra_op: int | None = None,
    inter_op: int = 1,
    cores: int | None = None,
) -> ThreadBudget:
    """The thread-budget rule. `intra_op`: the config's count (None or 0: not given);
    `cpu_sessions`: how many CPU sessions of the model run at once; `cores`: the cores they
    share (None: devices.session_cores(), every core for a compute-bound model)."""
    if intra_op:
        return ThreadBudget(intra_op, inter_op)
    if device.kind == "cuda":
        return ThreadBudget(1, inter_op)
    return ThreadBudget(split_cores(cpu_sessions, cores), inter_op)


@dataclass(slots=True)
class OpenedSession:
    session: ort.InferenceSession
    # The mapped weight files the session reads: release only after the session is dropped.
    weights: MappedWeights | None
    device: Device  # where it really runs
    # Pass to every run (None: onnxruntime's defaults).
    run_options: ort.RunOptions | None = None


def open_onnx_session(
    model: Path | onnx.ModelProto,
    device: Device,
    threads: ThreadBudget,
    *,
    what: str,
    settings: OrtSettings = DEFAULT_SETTINGS,
    weights_dir: Path | None = None,
    prepack: bool = True,
) -> OpenedSession:
    """Open `model` (a path, or a stage graph whose external weights are in `weights_dir`) on
    `device`. `what` names it in errors and warnings, e.g. "model 'm' from '/r/m/1/model.onnx'".
    Raises ModelLoadError."""
    options = session_options(threads, settings)
    providers = providers_for(device, settings)
    weights: MappedWeights | None = None
    try:
        if isinstance(model, Path):
            # External weights are mapped, checked against the pack index and prefetched.
            session, weights = open_session(model, providers, options, prepack=prepack)
        elif weights_dir is not None:
            # Only the byte ranges this graph references are checked, mapped and prefetched.
            session, weights = open_stage_session(
                model, weights_dir, providers, options, prepack=prepack
            )
        else:
            session = ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=providers
            )
    except PipeserveError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"onnxruntime could not load {what} on {device}: {exc}") from None
    if device.kind == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        log.warning(
            "%s asks for %s but onnxruntime's CUDA provider did not attach: it runs on the CPU",
            what,
            device,
        )
        device = CPU
    return OpenedSession(session, weights, device, run_options(settings))
