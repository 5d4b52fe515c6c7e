"""inference.GRPCInferenceService: a thin servicer that converts and delegates.

Every RPC converts protobuf to the data plane's calls (codec.py for tensors), calls
`serving.DataPlane`, and converts the answer back. Domain errors become status codes in
api/status.py. Handlers use only the servicer-context contract of api/context.py, so both gRPC
front ends run this one servicer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from pipeserve.api.codec import RequestHead, decode_request, encode_response
from pipeserve.api.context import (
    DirectResult,
    DirectStream,
    DirectUnary,
    ServicerContext,
    unparsable,
)
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.generated import grpc_service_pb2_grpc as pb_grpc
from pipeserve.api.request_wire import RequestReader
from pipeserve.api.response_wire import encode_response_bytes, stream_response_bytes
from pipeserve.api.status import guarded, refusal
from pipeserve.errors import PipeserveError
from pipeserve.inference import InferRequest
from pipeserve.registry import ServedVersion
from pipeserve.serving.dataplane import DataPlane, LoadParameter, VersionStatistics
from pipeserve.statistics import Duration

log = logging.getLogger(__name__)

# Responses of one stream that may be in flight at once; the reader waits beyond that.
STREAM_WINDOW = 256

# What the kept-header reader gives (api/request_wire.py): head, raw contents, request id.
Read = tuple[RequestHead, list[bytes | memoryview], str]
Started = tuple[ServedVersion, InferRequest, "asyncio.Future[dict[str, np.ndarray]]"]

if TYPE_CHECKING:
    from pipeserve.api.h2.server import H2Server


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, data_plane: DataPlane) -> None:
        self._dp = data_plane
        self._reader = RequestReader()  # infer_direct's; it runs on the event loop only

    # ---- health and metadata --------------------------------------------------------------

    @guarded
    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=self._dp.live())

    @guarded
    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=self._dp.ready())

    @guarded
    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version))

    @guarded
    async def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        meta = self._dp.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=list(meta.extensions)
        )

    @guarded
    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        meta = self._dp.model_metadata(request.name, request.version)
        response = pb.ModelMetadataResponse(
            name=meta.name, versions=list(meta.versions), platform=meta.platform
        )
        for tensors, target in ((meta.inputs, response.inputs), (meta.outputs, response.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return response

    @guarded
    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelConfigResponse(config=self._dp.model_config(request.name, request.version))

    @guarded
    async def ModelStatistics(self, request, context):  # type: ignore[no-untyped-def]
        versions = self._dp.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in versions])

    # ---- inference --------------------------------------------------------------------------

    @guarded
    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        return await self._infer(request)

    async def _infer(self, msg: pb.ModelInferRequest) -> pb.ModelInferResponse:
        served, request, outputs = self._start_infer(msg)
        return self._finish_infer(served, request, await outputs)

    def direct_methods(self) -> dict[str, DirectUnary | DirectStream]:
        """RPCs the own transport may run through a direct handler (api.context.DirectUnary,
        DirectStream) instead of the async one. A restricted servicer (api/restricted.py)
        leaves out those it must check first."""
        return {"ModelInfer": self.infer_direct, "ModelStreamInfer": self.stream_direct}

    def infer_direct(self, body: bytes | memoryview, kept: bool) -> DirectResult:
        """ModelInfer for the own transport, with no task and no coroutine per call (the
        event loop's largest per-request cost after the protocol itself): the same two halves
        as `_infer`, the same answers as `guarded` gives. The tensors are views of `body` when
        it is `kept` (api.context.DirectUnary), copies otherwise."""
        got = self._read(body, kept)
        try:
            served, request, outputs = self._start_wire(got)
        except Exception as exc:
            raise refusal(exc, "ModelInfer") from None
        return outputs, functools.partial(self._finish_direct, served, request)

    def stream_direct(self, body: bytes | memoryview) -> bytes | DirectResult:
        """One ModelStreamInfer request for the own transport (api.context.DirectStream): the
        same steps and answers as ModelStreamInfer's, with no task, queue entry or message
        object per request."""
        got = self._read(body)
        try:
            served, request, outputs = self._start_wire(got)
        except Exception as exc:
            return _stream_failure(got, exc).SerializeToString()
        return outputs, functools.partial(self._finish_streamed, got, served, request)

    def _read(self, body: bytes | memoryview, kept: bool = False) -> Read | pb.ModelInferRequest:
        """A request in the usual form read by the kept-header reader (api/request_wire.py),
        any other parsed in full (raising `unparsable(...)` when it does not parse)."""
        read = self._reader.read(body, kept)
        if read is not None:
            return read
        try:
            return pb.ModelInferRequest.FromString(body)
        except Exception as exc:
            raise unparsable(exc) from None

    def _start_wire(self, got: Read | pb.ModelInferRequest) -> Started:
        """_start_infer for what `_read` gave: a kept head's request takes the same steps in
        the same order (the model is looked up before the tensors are checked)."""
        if not isinstance(got, tuple):  # (tuple: a cheaper check than the message class)
            return self._start_infer(got)
        head, raw, request_id = got
        served = self._dp.lookup(head.model_name, head.model_version)
        request = head.request(raw, request_id)
        # Every request of one head has the same tensor names, datatypes, shapes and outputs
        # asked for: the served version validates that form once.
        return served, request, self._dp.submit(served, request, checked_as=head)

    def _finish_direct(
        self,
        served: ServedVersion,
        request: InferRequest,
        outputs: asyncio.Future[dict[str, np.ndarray]],
    ) -> bytes:
        try:
            return self._answer_bytes(served, request, outputs.result())
        except Exception as exc:
            raise refusal(exc, "ModelInfer") from None

    def _finish_streamed(
        self,
        got: Read | pb.ModelInferRequest,
        served: ServedVersion,
        request: InferRequest,
        outputs: asyncio.Future[dict[str, np.ndarray]],
    ) -> bytes:
        try:
            return stream_response_bytes(self._answer_bytes(served, request, outputs.result()))
        except Exception as exc:
            return _stream_failure(got, exc).SerializeToString()

    def _answer_bytes(
        self, served: ServedVersion, request: InferRequest, outputs: dict[str, np.ndarray]
    ) -> bytes:
        """The answer's wire bytes, written without building the message (the same bytes as
        `_finish_infer`'s message serialized: api/response_wire.py)."""
        response = self._dp.respond(served, request, outputs)
        encoded = encode_response_bytes(response, served.spec)
        self._dp.check_response_size(served, len(encoded))
        return encoded

    def _start_infer(self, msg: pb.ModelInferRequest) -> Started:
        """Look up, decode, validate and queue, in one synchronous step (DataPlane.submit)."""
        served = self._dp.lookup(msg.model_name, msg.model_version)
        request = decode_request(msg)
        return served, request, self._dp.submit(served, request)

    def _finish_infer(
        self, served: ServedVersion, request: InferRequest, outputs: dict[str, np.ndarray]
    ) -> pb.ModelInferResponse:
        encoded = encode_response(self._dp.respond(served, request, outputs), served.spec)
        # gRPC would refuse it too, but only after logging a traceback and without saying why.
        self._dp.check_response_size(served, encoded.ByteSize())
        return encoded

    async def ModelStreamInfer(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so they batch like unary ones): each is
        looked up, validated and queued as it arrives, with no task of its own, and its
        response is written as soon as it is ready. An error answers that request only. At
        most STREAM_WINDOW requests are in flight or answered and not yet written: the reader
        waits beyond that. (grpc.aio runs this; the own transport runs `stream_direct`, but for
        a call with compressed messages.)"""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)  # released as each answer is written
        running: set[asyncio.Future[dict[str, np.ndarray]]] = set()
        reading = True

        def settle(
            msg: pb.ModelInferRequest,
            served: ServedVersion,
            request: InferRequest,
            outputs: asyncio.Future[dict[str, np.ndarray]],
        ) -> None:
            running.discard(outputs)
            if outputs.cancelled():  # the stream is ending: nobody reads an answer
                window.release()
            else:
                try:
                    answer = self._finish_infer(served, request, outputs.result())
                    results.put_nowait(pb.ModelStreamInferResponse(infer_response=answer))
                except Exception as exc:
                    results.put_nowait(_stream_failure(msg, exc))
            if not reading and not running:
                results.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for msg in request_iterator:
                    await window.acquire()
                    try:
                        served, request, outputs = self._start_infer(msg)
                    except Exception as exc:
                        results.put_nowait(_stream_failure(msg, exc))
                        continue
                    running.add(outputs)
                    outputs.add_done_callback(functools.partial(settle, msg, served, request))
            finally:
                reading = False
                if not running:
                    results.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
                window.release()
            await reader  # re-raises a reader failure
        finally:
            reader.cancel()
            for outputs in list(running):
                outputs.cancel()  # drops the stream's work not yet run

    # ---- repository -------------------------------------------------------------------------

    @guarded
    async def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        response = pb.RepositoryIndexResponse()
        for entry in self._dp.index(ready_only=request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state.value, reason=entry.reason
            )
        return response

    @guarded
    async def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        self._dp.check_repository(request.repository_name)
        parameters: dict[str, LoadParameter | None] = {}
        for key, param in request.parameters.items():
            choice = param.WhichOneof("parameter_choice")
            parameters[key] = getattr(param, choice) if choice else None
        await self._dp.load(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        self._dp.check_repository(request.repository_name)
        await self._dp.unload(request.model_name)
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
    DataPlane.unsupported(what)


def _stream_failure(
    got: Read | pb.ModelInferRequest, exc: Exception
) -> pb.ModelStreamInferResponse:
    """The answer to one stream request that failed (call it inside the `except`): it repeats
    the request's model, version and id as sent."""
    if isinstance(got, tuple):  # read through its kept head
        head, _, request_id = got
        model_name, model_version = head.model_name, head.model_version
    else:
        model_name, model_version, request_id = got.model_name, got.model_version, got.id
    if isinstance(exc, PipeserveError):
        message = exc.message
    else:
        log.exception("unexpected error in a stream request")
        message = f"internal error: {exc}"
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=model_name, model_version=model_version, id=request_id
        ),
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(version: VersionStatistics) -> pb.ModelStatistics:
    s = version.stats
    stats = pb.ModelStatistics(
        name=version.name,
        version=version.version,
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
    add_direct = getattr(server, "add_direct", None)
    if add_direct is not None:  # the own transport: these run without a task
        for name, handler in service.direct_methods().items():
            add_direct("inference.GRPCInferenceService", name, handler)
