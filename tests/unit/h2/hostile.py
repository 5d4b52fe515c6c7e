"""Harness for the resource and flood tests of api/h2: the echo service of h2_driver with a
`Stats` method (what the server holds, read over gRPC), a server in this loop or in a
subprocess (for memory: its RSS read from /proc), and helpers that read the server's final
answer on a raw connection (GOAWAY code, RST_STREAM code, closed)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import asdict
from typing import Any

import grpc

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.limits import H2Limits
from pipeserve.api.h2.server import H2Server
from tests.unit.h2_driver import SERVICE, EchoService, RawClient, channel, message

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


class StatsService(EchoService):
    """EchoService plus Stats (calls, connections and in-flight request bytes of the server),
    Trim (see there) and Size (the request's length)."""

    def __init__(self, server: H2Server) -> None:
        super().__init__()
        self.server = server

    async def stats(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        s = self.server
        return json.dumps(
            {
                "calls": s.call_count(),
                "connections": s.connection_count(),
                "inflight": s.inflight_request_bytes(),
            }
        ).encode()

    async def trim(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        """Hands freed memory back to the OS, so RSS measures what is still alive: glibc keeps
        freed heap (its mmap threshold rises after the first big free) until asked."""
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return b""

    async def size(self, request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        return str(len(request)).encode()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        out = super().handlers()
        for name, method in (("Stats", self.stats), ("Trim", self.trim), ("Size", self.size)):
            out[name] = grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=bytes, response_serializer=bytes
            )
        return out


async def start(
    limits: H2Limits | None = None, max_message: int = 64 << 20
) -> tuple[H2Server, StatsService, int]:
    server = H2Server(max_receive=max_message, max_send=max_message, limits=limits)
    service = StatsService(server)
    server.add_registered_method_handlers(SERVICE, service.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, service, port


@contextlib.asynccontextmanager
async def serving(
    limits: H2Limits | None = None, max_message: int = 64 << 20
) -> AsyncIterator[tuple[H2Server, StatsService, int]]:
    server, service, port = await start(limits, max_message)
    try:
        yield server, service, port
    finally:
        await server.stop(0)


def limits(**changes: object) -> H2Limits:
    """The default limits with `changes`."""
    return dataclasses.replace(H2Limits(), **changes)  # type: ignore[arg-type]


def run(coro: Coroutine[Any, Any, None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def echo(port: int, payload: bytes = b"still answered", timeout: float = 10) -> bytes:
    """One call from the well-behaved client: real grpc C-core on its own connection."""
    async with channel(port) as ch:
        call = ch.unary_unary(
            f"/{SERVICE}/Echo", request_serializer=bytes, response_deserializer=bytes
        )
        return await call(payload, timeout=timeout)  # type: ignore[no-any-return]


async def stats(port: int, method: str = "Stats") -> dict[str, int]:
    async with channel(port) as ch:
        call = ch.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=bytes, response_deserializer=bytes
        )
        answer = await call(b"", timeout=10)
        return json.loads(answer) if answer else {}  # type: ignore[no-any-return]


async def settle(port: int, calls: int = 1, timeout: float = 10) -> dict[str, int]:
    """Stats once the server holds no more than `calls` calls (the Stats call itself)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        now = await stats(port)
        if now["calls"] <= calls or loop.time() > end:
            return now
        await asyncio.sleep(0.05)


class Ending:
    """How the server ended a raw connection."""

    def __init__(self) -> None:
        self.goaway_code: int | None = None
        self.goaway_debug = b""
        self.last_stream_id: int | None = None
        self.closed = False
        self.resets: dict[int, int] = {}  # stream -> RST_STREAM code
        self.frames: list[tuple[int, int, int, bytes]] = []


async def ending(client: RawClient, timeout: float = 10.0) -> Ending:
    """Reads every frame until the server closes the connection (or `timeout`)."""
    out = Ending()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            kind, flags, sid, payload = await client.frame(max(0.01, end - loop.time()))
        except (asyncio.IncompleteReadError, ConnectionError):
            out.closed = True
            return out
        except TimeoutError:
            return out
        out.frames.append((kind, flags, sid, payload))
        if kind == f.GOAWAY:
            out.last_stream_id = int.from_bytes(payload[:4], "big")
            out.goaway_code = int.from_bytes(payload[4:8], "big")
            out.goaway_debug = payload[8:]
        elif kind == f.RST_STREAM:
            out.resets[sid] = int.from_bytes(payload, "big")


# ---- a server in a subprocess, for memory ---------------------------------------------------


class Subprocess:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    def rss(self) -> int:
        """Resident set size of the server process, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextlib.contextmanager
def subprocess_server(
    limits: H2Limits | None = None, max_message: int = 64 << 20
) -> Iterator[Subprocess]:
    config = json.dumps({"limits": asdict(limits or H2Limits()), "max_message": max_message})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.h2.serve", config],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        yield Subprocess(proc, int(line.split()[1]))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def rss_settled(server: Subprocess, port: int) -> int:
    """RSS once the server answered a few calls (what a test left behind has been freed)."""
    for _ in range(3):
        await echo(port)
    await settle(port)
    await stats(port, "Trim")
    return server.rss()


__all__ = ["RawClient", "SERVICE", "channel", "message"]
