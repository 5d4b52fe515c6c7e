"""inference.GRPCInferenceService: a thin servicer that converts and delegates.

Every RPC converts protobuf to domain types (codec), calls the registry / model control, and
converts back. Domain errors become status codes in api/status.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from pipeserve import __version__
from pipeserve.api.codec import decode_request, encode_response
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.generated import grpc_service_pb2_grpc as pb_grpc
from pipeserve.api.status import guarded
from pipeserve.errors import (
    ConfigError,
    InvalidInputError,
    ModelNotFoundError,
    PipeserveError,
    ResponseTooLargeError,
    UnsupportedError,
)
from pipeserve.inference import InferResponse
from pipeserve.registry import Registry, ServedVersion
from pipeserve.repository.config import parse_config_json
from pipeserve.repository.control import ModelControl
from pipeserve.statistics import Duration

log = logging.getLogger(__name__)

# Only what is really implemented: perf_analyzer asks for statistics because it is listed.
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
)

# Responses of one stream that may be in flight at once; the reader waits beyond that.
STREAM_WINDOW = 256

if TYPE_CHECKING:
    from pipeserve.api.h2.server import H2Server


class ServerState:
    """Liveness / readiness shared by the inference and health services."""

    def __init__(self) -> None:
        self.live = True
        self.ready = False
        self.draining = False
        self.changed = asyncio.Event()

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.changed.set()
        self.changed = asyncio.Event()

    def start_draining(self) -> None:
        """Not ready any more, for good: open health watches say so and end."""
        self.draining = True
        self.set_ready(False)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: Registry,
        control: ModelControl,
        state: ServerState,
        max_message_bytes: int,
    ) -> None:
        self._registry = registry
        self._control = control
        self._state = state
        self._max_message_bytes = max_message_bytes

    # ---- health and metadata --------------------------------------------------------------

    @guarded
    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=self._state.live)

    @guarded
    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=self._state.ready)

    @guarded
    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelReadyResponse(ready=self._registry.is_ready(request.name, request.version))

    @guarded
    async def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerMetadataResponse(
            name="pipeserve", version=__version__, extensions=list(EXTENSIONS)
        )

    @guarded
    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        served = self._registry.lookup(request.name, request.version)
        spec = served.spec
        batch = [-1] if spec.batching else []
        response = pb.ModelMetadataResponse(
            name=spec.name,
            versions=[str(v.version) for v in self._registry.served_versions(spec.name)],
            platform=served.config.platform,
        )
        for tensors, target in ((spec.inputs, response.inputs), (spec.outputs, response.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
        return response

    @guarded
    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        served = self._registry.lookup(request.name, request.version)
        return pb.ModelConfigResponse(config=served.config)

    @guarded
    async def ModelStatistics(self, request, context):  # type: ignore[no-untyped-def]
        if request.name:
            if request.version:
                versions = [self._registry.lookup(request.name, request.version)]
            else:
                versions = self._registry.served_versions(request.name)
                if not versions:
                    raise ModelNotFoundError.for_model(request.name)
        else:
            versions = [
                v
                for name in self._registry.model_names()
                for v in self._registry.served_versions(name)
            ]
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    # ---- inference --------------------------------------------------------------------------

    @guarded
    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return await self._infer(request)

    async def _infer(self, msg: pb.ModelInferRequest) -> pb.ModelInferResponse:
        # Looked up first: an unknown model is reported as such even when the tensors are
        # malformed too (Triton). No await before submit, so a reload cannot slip in between.
        served = self._registry.lookup(msg.model_name, msg.model_version)
        request = decode_request(msg)
        outputs = await served.submit(request)
        response = InferResponse(
            model_name=served.name,
            model_version=str(served.version),
            request_id=request.request_id,
            outputs=outputs,
        )
        encoded = encode_response(response, served.spec)
        # gRPC would refuse it too, but only after logging a traceback and without saying why.
        size = encoded.ByteSize()
        if size > self._max_message_bytes:
            raise ResponseTooLargeError(
                f"response of model '{served.name}' is {size} bytes, over the server's "
                f"--max-message-bytes limit of {self._max_message_bytes}"
            )
        return encoded

    async def ModelStreamInfer(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so they batch like unary ones); each response
        is written as soon as it is ready. An error answers that request only."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(STREAM_WINDOW)
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def one(msg: pb.ModelInferRequest) -> None:
            try:
                item = pb.ModelStreamInferResponse(infer_response=await self._infer(msg))
            except PipeserveError as exc:
                item = _stream_error(msg, exc.message)
            except Exception as exc:
                log.exception("unexpected error in a stream request")
                item = _stream_error(msg, f"internal error: {exc}")
            await results.put(item)

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for msg in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: window.release())
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
            await reader  # re-raises a reader failure
        finally:
            reader.cancel()

    # ---- repository -------------------------------------------------------------------------

    @guarded
    async def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        response = pb.RepositoryIndexResponse()
        for entry in self._control.index(ready_only=request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state.value, reason=entry.reason
            )
        return response

    @guarded
    async def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        _check_repository_name(request.repository_name)
        override = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            if key == "config":
                if param.WhichOneof("parameter_choice") != "string_param":
                    raise ConfigError("load parameter 'config' must be a string (JSON)")
                override = parse_config_json(param.string_param)
            elif key.startswith("file:"):
                if param.WhichOneof("parameter_choice") != "bytes_param":
                    raise InvalidInputError(f"load parameter '{key}' must carry bytes")
                files[key.removeprefix("file:")] = param.bytes_param
            else:
                raise InvalidInputError(
                    f"unknown load parameter '{key}', expected 'config' or 'file:<path>'"
                )
        await self._control.load(request.model_name, override, files)
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        _check_repository_name(request.repository_name)
        await self._control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- not implemented: answered clearly ----------------------------------------------------

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = guarded(
        lambda self, r, c: _unimplemented("system shared memory")
    )  # type: ignore[misc]
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = guarded(
        lambda self, r, c: _unimplemented("CUDA shared memory")
    )  # type: ignore[misc]
    TraceSetting = guarded(lambda self, r, c: _unimplemented("trace settings"))  # type: ignore[misc]
    LogSettings = guarded(lambda self, r, c: _unimplemented("log settings"))  # type: ignore[misc]


async def _unimplemented(what: str) -> None:
    raise UnsupportedError(f"{what} is not supported by pipeserve")


def _check_repository_name(name: str) -> None:
    if name:
        raise InvalidInputError(
            f"unknown repository '{name}': pipeserve serves one repository (leave it empty)"
        )


def _stream_error(msg: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=msg.model_name, model_version=msg.model_version, id=msg.id
        ),
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(served: ServedVersion) -> pb.ModelStatistics:
    s = served.stats.snapshot()
    stats = pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
    )
    for size, b in s.batch_stats.items():
        stats.batch_stats.add(
            batch_size=size,
            compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer),
            compute_output=_duration(b.compute_output),
        )
    return stats


def add_to_server(service: InferenceService, server: grpc.aio.Server | H2Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
