"""Interoperability with a second, independent HTTP/2 + gRPC implementation: Node's
@grpc/grpc-js (pinned in tests/interop/package-lock.json)

- runs unary, streaming, deadline, cancellation, error-status and compression cases against the
  own transport in process (tests/interop/grpc_js_client.js), and the server side is checked
  too (the handlers that the deadline and the cancellation should stop were cancelled);
- calls the KServe v2 API of the real server (tests/interop/grpc_js_kserve.js, stubs built by
  @grpc/proto-loader from proto/): metadata, ModelInfer alone and 64 at once, ModelStreamInfer,
  a cancelled stream, an unknown model, a deadline that expires while the server holds the call.

Needs `node` and `npm ci --prefix tests/interop` (CI does both, see .ci/run). Without them the
test skips, naming what is missing; with PIPESERVE_TEST_REQUIRE_INTEROP=1 (set in CI) it fails
instead, so a broken install cannot hide behind a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import standard_repository
from tests.e2e.lifecycle import SLOW_CONFIG, place_model, slow_model
from tests.e2e.server import ServerProcess
from tests.unit.h2_driver import start

HERE = Path(__file__).parent
SCRIPT = HERE / "grpc_js_client.js"
KSERVE_SCRIPT = HERE / "grpc_js_kserve.js"
PROTO = HERE.parent.parent / "proto"


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node not found (Debian: apt-get install nodejs npm)"
    if not (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "@grpc/grpc-js not installed (npm ci --prefix tests/interop)"
    return None


def _require_or_skip() -> None:
    missing = _missing()
    if missing is None:
        return
    if os.environ.get("PIPESERVE_TEST_REQUIRE_INTEROP") == "1":
        pytest.fail(f"PIPESERVE_TEST_REQUIRE_INTEROP=1 but {missing}")
    pytest.skip(missing)


def test_grpc_js_client_against_the_own_transport() -> None:
    _require_or_skip()

    async def main() -> tuple[dict[str, dict[str, object]], int]:
        server, service, port = await start()
        cancelled = 0
        wait = service.wait

        async def counting_wait(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            nonlocal cancelled
            try:
                return await wait(request, context)
            except asyncio.CancelledError:
                cancelled += 1
                raise

        service.wait = counting_wait  # type: ignore[method-assign]
        server.add_registered_method_handlers("test.Echo", service.handlers())
        try:
            node = await asyncio.create_subprocess_exec(
                "node",
                str(SCRIPT),
                str(port),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(node.communicate(), 60)
            assert node.returncode == 0, err.decode()
            # The cancellations reach the handlers before the client moves on; let the last
            # one's task finish running its except clause.
            for _ in range(100):
                if cancelled >= 2:
                    break
                await asyncio.sleep(0.05)
            return json.loads(out), cancelled
        finally:
            await server.stop(0)

    results, cancelled = asyncio.run(main())
    expected = {
        "unary",
        "unary_5mib",
        "concurrent_200",
        "server_streaming",
        "client_streaming",
        "bidi_streaming",
        "deadline",
        "cancel",
        "cancel_stream",
        "error_status",
        "unimplemented",
        "gzip_request",
        "after_all",
    }
    assert set(results) == expected
    failed = {name: seen for name, seen in results.items() if seen.get("ok") is not True}
    assert not failed, f"grpc-js cases failed: {failed}"
    # Server side: the deadline and the unary cancellation each cancelled a Wait handler.
    assert cancelled == 2


def test_grpc_js_calls_the_kserve_api_of_the_real_server(tmp_path: Path) -> None:
    _require_or_skip()
    repo = standard_repository(tmp_path)
    # Milliseconds per request: a 1 ms deadline expires while the server holds the request (on
    # add_sub the answer can come back inside it).
    place_model(repo, "slow", {1: slow_model()}, SLOW_CONFIG)
    server = ServerProcess(repo, metrics=False).wait_ready()
    try:
        done = subprocess.run(
            ["node", str(KSERVE_SCRIPT), str(server.grpc_port), str(PROTO)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
    finally:
        server.stop()
    assert set(results) == {
        "server_live",
        "model_metadata",
        "model_infer",
        "model_infer_64_concurrent",
        "unknown_model",
        "stream_infer",
        "stream_cancel",
        "deadline",
    }
    failed = {name: seen for name, seen in results.items() if seen.get("ok") is not True}
    assert not failed, f"grpc-js cases failed: {failed}"
