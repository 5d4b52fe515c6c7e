"""The URL table of the KServe v2 REST protocol with Triton's extensions, and its handlers.

Paths, methods and answers follow Triton's `HTTPAPIServer::Handle` (src/http_server.cc): an
unknown path is 404 `{"error": "Not Found"}`, a known path with another method 405
`{"error": "Method Not Allowed"}`. Each handler converts and delegates to the DataPlane, which
every front end shares; domain errors become statuses in errors.py.

The repository routes (index, load, unload) are one table, `REPOSITORY_ROUTES`, so a policy that
guards model management can wrap exactly them.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeserve.api.http import views
from pipeserve.api.http.binary_heads import BinaryHeads
from pipeserve.api.http.codec import (
    INFER_HEADER,
    decode_infer,
    decode_raw,
    encode_infer,
    header_length,
    parse_json,
)
from pipeserve.api.http.compression import compress, decompress, response_encoding
from pipeserve.api.http.errors import HttpError, error_body, http_status
from pipeserve.errors import InvalidInputError, PipeserveError
from pipeserve.restrictions import Restrictions
from pipeserve.serving.dataplane import DataPlane

log = logging.getLogger(__name__)

JSON = b"application/json"
BINARY = b"application/octet-stream"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[bytes, bytes]  # lower-case names
    body: bytes
    client: tuple[str, int] | None = None  # the client's address, for log lines

    @property
    def peer(self) -> str:
        """HOST:PORT of the client (formatted only when a log line needs it)."""
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"


@dataclass(slots=True)
class Response:
    status: int
    chunks: list[bytes | memoryview] = field(default_factory=list)
    content_type: bytes | None = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, doc: Any, status: int = 200) -> Response:
        return cls(status, [views.dumps(doc)])

    @classmethod
    def error(
        cls, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> Response:
        return cls(status, [error_body(message)], JSON, headers)

    @classmethod
    def empty(cls, status: int = 200) -> Response:
        return cls(status, [], None)


Handler = Callable[..., Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    methods: Mapping[str, str]  # HTTP method -> Router method name


def _route(pattern: str, **methods: str) -> Route:
    return Route(re.compile(pattern), methods)


_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]+))?"
_SHM = r"/v2/systemsharedmemory(?:/region/[^/]+)?"
_CUDA_SHM = r"/v2/cudasharedmemory(?:/region/[^/]+)?"
_TRACE = "unsupported_trace"

# Matched in order, like Triton's Handle(): /v2/models/stats before a model named "stats".
# /infer first: it is the hot path, and no other pattern matches a path ending in /infer.
ROUTES: tuple[Route, ...] = (
    _route(_MODEL + r"/infer", POST="infer"),
    _route(r"/v2/models/stats", GET="statistics"),
    _route(r"/v2/logging", GET="unsupported_logging", POST="unsupported_logging"),
    _route(_MODEL + r"/ready", GET="model_ready"),
    _route(_MODEL + r"/config", GET="model_config"),
    _route(_MODEL + r"/stats", GET="statistics"),
    _route(r"/v2/models/(?P<name>[^/]+)/trace/setting", GET=_TRACE, POST=_TRACE),
    _route(_MODEL, GET="model_metadata"),
    _route(r"/v2", GET="server_metadata"),
    _route(r"/v2/health/(?P<kind>live|ready)", GET="health"),
    _route(_SHM + r"/status", GET="unsupported_shm"),
    _route(_SHM + r"/(?:register|unregister)", POST="unsupported_shm"),
    _route(_CUDA_SHM + r"/status", GET="unsupported_cuda_shm"),
    _route(_CUDA_SHM + r"/(?:register|unregister)", POST="unsupported_cuda_shm"),
    _route(r"/v2/trace/setting", GET=_TRACE, POST=_TRACE),
)

# Model management: the one place a guard on the repository endpoints applies.
REPOSITORY_ROUTES: tuple[Route, ...] = (
    _route(r"/v2/repository(?:/(?P<repository>[^/]+))?/index", POST="repository_index"),
    _route(
        r"/v2/repository(?:/(?P<repository>[^/]+))?/models/(?P<name>[^/]+)/load",
        POST="repository_load",
    ),
    _route(
        r"/v2/repository(?:/(?P<repository>[^/]+))?/models/(?P<name>[^/]+)/unload",
        POST="repository_unload",
    ),
)


# Every handler by Triton's API group (--http-restricted-api, --http-disable-api).
HANDLER_GROUPS: Mapping[str, str] = {
    "health": "health",
    "model_ready": "health",
    "server_metadata": "metadata",
    "model_metadata": "metadata",
    "infer": "inference",
    "model_config": "model-config",
    "statistics": "statistics",
    "repository_index": "model-repository",
    "repository_load": "model-repository",
    "repository_unload": "model-repository",
    "unsupported_shm": "shared-memory",
    "unsupported_cuda_shm": "shared-memory",
    "unsupported_trace": "trace",
    "unsupported_logging": "logging",
}


class Router:
    def __init__(
        self,
        dataplane: DataPlane,
        max_body_bytes: int,
        restrictions: Restrictions | None = None,
    ) -> None:
        self._dp = dataplane
        self._restrictions = restrictions or Restrictions(noun="API")
        self._heads = BinaryHeads()  # kept JSON headers of binary requests (event loop only)
        # Bound on a decompressed body (the server's --max-message-bytes, as for plain bodies).
        self._limit = max_body_bytes
        self._routes = ROUTES + REPOSITORY_ROUTES

    async def dispatch(self, request: Request) -> Response:
        for route in self._routes:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            name = route.methods.get(request.method)
            if name is None:
                return Response.error(405, "Method Not Allowed")
            denied = self._denial(name, request)
            if denied is not None:
                return denied
            handler: Handler = getattr(self, name)
            args = {k: v for k, v in match.groupdict().items() if v is not None}
            try:
                return await handler(request, **args)
            except PipeserveError as exc:
                return Response.error(http_status(exc), exc.message)
            except HttpError as exc:
                return Response.error(exc.status, exc.message, exc.headers)
            except Exception as exc:
                log.exception("unexpected error answering %s %s", request.method, request.path)
                return Response.error(500, f"internal error: {exc}")
        return Response.error(404, "Not Found")

    def _denial(self, handler: str, request: Request) -> Response | None:
        """403 with Triton's message when the handler's API group is restricted or off."""
        if not self._restrictions:
            return None

        def header(name: str) -> str | None:
            value = request.headers.get(name.encode("latin-1"))
            return None if value is None else value.decode("latin-1")

        message = self._restrictions.denial(HANDLER_GROUPS[handler], header)
        if message is None:
            return None
        log.warning("denied %s %s from %s: %s", request.method, request.path, request.peer, message)
        return Response.error(403, message)

    # ---- health and metadata --------------------------------------------------------------

    async def health(self, request: Request, kind: str) -> Response:
        ok = self._dp.live() if kind == "live" else self._dp.ready()
        return Response.empty(200 if ok else 400)

    async def model_ready(self, request: Request, name: str, version: str = "") -> Response:
        if self._dp.model_ready(name, version):
            return Response.empty()
        return Response.error(400, "Model version not ready")

    async def server_metadata(self, request: Request) -> Response:
        return Response.json(views.server_metadata(self._dp.server_metadata()))

    async def model_metadata(self, request: Request, name: str, version: str = "") -> Response:
        return Response.json(views.model_metadata(self._dp.model_metadata(name, version)))

    async def model_config(self, request: Request, name: str, version: str = "") -> Response:
        return Response.json(views.message(self._dp.model_config(name, version)))

    async def statistics(self, request: Request, name: str = "", version: str = "") -> Response:
        return Response.json(views.statistics(self._dp.statistics(name, version)))

    # ---- inference --------------------------------------------------------------------------

    async def infer(self, request: Request, name: str, version: str = "") -> Response:
        # Looked up first, as on gRPC: an unknown model is reported as such even when the body
        # is malformed too. No await between lookup and infer, so a reload cannot slip in.
        served = self._dp.lookup(name, version)
        body = decompress(request.body, request.headers.get(b"content-encoding"), self._limit)
        size = header_length(request.headers.get(INFER_HEADER), len(body))
        form = None
        if size == 0:
            infer_request, choice = decode_raw(name, version, body, served.spec)
        else:
            infer_request, choice, form = decode_infer(name, version, body, size, self._heads)
        # Every request of one kept head has the same form: validated once (checked_as).
        response = await self._dp.infer(served, infer_request, checked_as=form)
        encoded = encode_infer(response, served.spec, choice)
        self._dp.check_response_size(served, encoded.size)
        headers: list[tuple[bytes, bytes]] = []
        content_type = JSON
        if encoded.header_length is not None:
            content_type = BINARY
            headers.append((INFER_HEADER, str(encoded.header_length).encode()))
        chunks = encoded.chunks
        encoding = response_encoding(request.headers.get(b"accept-encoding"))
        if encoding is not None:
            chunks = [compress(chunks, encoding)]
            headers.append((b"content-encoding", encoding.encode()))
        return Response(200, chunks, content_type, tuple(headers))

    # ---- repository -------------------------------------------------------------------------

    async def repository_index(self, request: Request, repository: str = "") -> Response:
        self._dp.check_repository(repository)
        doc = _body_object(request, "repository index request")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError("Invalid value for 'ready': expected a boolean")
        return Response.json(views.index(self._dp.index(ready_only=ready)))

    async def repository_load(self, request: Request, name: str, repository: str = "") -> Response:
        self._dp.check_repository(repository)
        doc = _body_object(request, "load model request")
        params = doc.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInputError("'parameters' of a load request must be a JSON object")
        parameters: dict[str, str | bytes | bool | int] = {}
        for key, value in params.items():
            if key.startswith("file:"):
                # Triton's HTTP API carries file contents base64-encoded.
                if not isinstance(value, str):
                    raise InvalidInputError(f"load parameter '{key}' must be a base64 string")
                try:
                    parameters[key] = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInputError(
                        f"load parameter '{key}' is not valid base64 (Triton's HTTP API sends "
                        f"file contents base64-encoded)"
                    ) from None
            elif isinstance(value, str | bool | int):
                parameters[key] = value
            else:
                raise InvalidInputError(
                    f"load parameter '{key}' must be a string, boolean or integer"
                )
        await self._dp.load(name, parameters)
        return Response.empty()

    async def repository_unload(
        self, request: Request, name: str, repository: str = ""
    ) -> Response:
        self._dp.check_repository(repository)
        _body_object(request, "unload model request")
        await self._dp.unload(name)
        return Response.empty()

    # ---- not supported: answered as the gRPC side answers -------------------------------------

    async def unsupported_shm(self, request: Request) -> Response:
        return self._refuse("system shared memory")

    async def unsupported_cuda_shm(self, request: Request) -> Response:
        return self._refuse("CUDA shared memory")

    async def unsupported_trace(self, request: Request, name: str = "") -> Response:
        return self._refuse("trace settings")

    async def unsupported_logging(self, request: Request) -> Response:
        return self._refuse("log settings")

    def _refuse(self, what: str) -> Response:
        self._dp.unsupported(what)  # raises UnsupportedError, the gRPC side's words
        raise AssertionError(f"DataPlane.unsupported({what!r}) returned")


def _body_object(request: Request, what: str) -> dict[str, Any]:
    """An optional JSON object body (Triton accepts an empty body for these)."""
    if not request.body:
        return {}
    doc = parse_json(request.body, what)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"the {what} must be a JSON object")
    return doc
