"""The servicer-context contract (api/context.py) holds on both gRPC front ends: a handler that
reads `invocation_metadata()` and `peer()` sees the same on the own transport as on grpc.aio."""

from __future__ import annotations

import asyncio
import json

import grpc

from pipeserve.api.h2.server import H2Server

SERVICE = "test.Context"


def _same(b: bytes) -> bytes:
    return b


async def _describe(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
    seen = [
        (k, v.hex() if isinstance(v, bytes) else v) for k, v in context.invocation_metadata() or ()
    ]
    return json.dumps({"metadata": seen, "peer": context.peer()}).encode()


def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Describe": grpc.unary_unary_rpc_method_handler(
            _describe, request_deserializer=_same, response_serializer=_same
        )
    }


async def _ask(server: grpc.aio.Server | H2Server) -> dict[str, object]:
    server.add_registered_method_handlers(SERVICE, _handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(
                f"/{SERVICE}/Describe", request_serializer=_same, response_deserializer=_same
            )
            metadata = (("x-admin-key", "s3cret"), ("x-trace-bin", b"\x00\xff\x10"), ("x-n", "1"))
            answer: dict[str, object] = json.loads(await call(b"", metadata=metadata))
            return answer
    finally:
        await server.stop(0)


def test_metadata_and_peer_are_the_same_on_both_front_ends() -> None:
    async def main() -> tuple[dict[str, object], dict[str, object]]:
        own = await _ask(H2Server(max_receive=1 << 20, max_send=1 << 20))
        reference = await _ask(grpc.aio.server(options=[("grpc.so_reuseport", 0)]))
        return own, reference

    own, reference = asyncio.run(asyncio.wait_for(main(), 30))
    # Everything the client sent beyond the transport's own headers, user-agent included.
    assert own["metadata"] == reference["metadata"]
    assert [m for m in own["metadata"] if m[0] != "user-agent"] == [  # type: ignore[union-attr]
        ["x-admin-key", "s3cret"],
        ["x-trace-bin", "00ff10"],
        ["x-n", "1"],
    ]
    assert str(own["peer"]).startswith("ipv4:127.0.0.1:")
    assert str(reference["peer"]).startswith("ipv4:127.0.0.1:")
