"""The HTTP listener on its own: any ASGI callable, served over TLS when given an SSLContext,
the bound port read back, refused after stop."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pipeserve.api.http.listener import HttpLimits, HttpServer, Receive, Scope, Send


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


def _fetch(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        return reply.read()


def test_serves_an_asgi_callable_on_a_free_port_and_stops() -> None:
    async def scenario() -> None:
        server = HttpServer(hello, "127.0.0.1", 0, HttpLimits())
        await server.start()
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/"
        assert await asyncio.to_thread(_fetch, url) == b"hello"
        await server.stop(grace=1)
        with pytest.raises(OSError):
            await asyncio.to_thread(_fetch, url)

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_serves_tls_with_the_given_ssl_context(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def scenario() -> None:
        server = HttpServer(hello, "127.0.0.1", 0, HttpLimits(), ssl_context=server_context)
        await server.start()
        try:
            url = f"https://127.0.0.1:{server.port}/"
            assert await asyncio.to_thread(_fetch, url, client_context) == b"hello"
            with pytest.raises(OSError):  # plain HTTP is not answered on a TLS listener
                await asyncio.to_thread(_fetch, f"http://127.0.0.1:{server.port}/")
        finally:
            await server.stop(grace=1)

    asyncio.run(scenario())
