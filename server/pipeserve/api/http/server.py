"""The ASGI callable of the KServe v2 REST API: read the body (bounded by the server's
--max-message-bytes, checked against Content-Length before reading and while reading a chunked
body), route it (routes.py), write the answer. The listener that drives it: listener.py."""

from __future__ import annotations

from pipeserve.api.http.errors import HttpError
from pipeserve.api.http.listener import Receive, Scope, Send
from pipeserve.api.http.routes import Request, Response, Router


class HttpApp:
    """The ASGI callable: read the body (bounded), route, write the answer."""

    def __init__(self, router: Router, max_body_bytes: int) -> None:
        self._router = router
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served
            return
        headers = dict(scope["headers"])  # uvicorn gives lower-case names
        try:
            body = await self._read_body(receive, headers)
        except HttpError as exc:
            # The rest of the body is not read: the connection closes after this answer.
            extra = (*exc.headers, (b"connection", b"close"))
            await _send(send, Response.error(exc.status, exc.message, extra))
            return
        request = Request(scope["method"], scope["path"], headers, body, scope.get("client"))
        await _send(send, await self._router.dispatch(request))

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _too_large(int(declared), self._max_body)
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            return body  # the common case: one piece, no copy
        buffer = bytearray(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client disconnected before sending the whole body")
            buffer += message.get("body", b"")
            if len(buffer) > self._max_body:
                raise _too_large(len(buffer), self._max_body)
        return bytes(buffer)


def _too_large(size: int, limit: int) -> HttpError:
    return HttpError(
        413,
        # Triton's words (its L0_http test checks them), with this server's flag.
        f"request JSON size of {size} bytes exceeds the maximum allowed input size of {limit} "
        f"bytes. Use --max-message-bytes to increase the limit.",
    )


async def _send(send: Send, response: Response) -> None:
    length = sum(len(c) for c in response.chunks)
    headers = [(b"content-length", str(length).encode()), *response.headers]
    if response.content_type is not None:
        headers.append((b"content-type", response.content_type))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    # One body message per chunk (JSON, then binary sections, no join here): the listener
    # sends the head and every chunk written in this loop iteration in one send(), copying the
    # outputs once (listener.py).
    last = len(response.chunks) - 1
    if last < 0:
        await send({"type": "http.response.body", "body": b""})
    for i, chunk in enumerate(response.chunks):
        await send({"type": "http.response.body", "body": chunk, "more_body": i < last})
