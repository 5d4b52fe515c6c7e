"""Raw HTTP/2 load from a third implementation: nghttp2's `h2load` (Debian `nghttp2-client`)
sends gRPC-framed unary requests over several connections with many streams each, once with
its default windows and once with 1 KiB stream windows (the server's sending side must follow
WINDOW_UPDATEs for every answer). Every request must succeed and every answer carry its message.

Without `h2load` the test skips, naming what is missing; with PIPESERVE_TEST_REQUIRE_INTEROP=1
(set in CI, which installs nghttp2-client) it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.unit.h2_driver import message, start

REQUESTS = 4000


def _require_or_skip() -> None:
    if shutil.which("h2load") is not None:
        return
    missing = "h2load not found (Debian: apt-get install nghttp2-client)"
    if os.environ.get("PIPESERVE_TEST_REQUIRE_INTEROP") == "1":
        pytest.fail(f"PIPESERVE_TEST_REQUIRE_INTEROP=1 but {missing}")
    pytest.skip(missing)


@pytest.mark.parametrize(
    ("method", "body", "answer", "windows"),
    [
        ("Echo", b"hello h2load", len(message(b"hello h2load")), []),
        # 10-bit windows: 1 KiB per stream and per connection, for 3,005-byte answers.
        ("Big", b"3000", len(message(bytes(3000))), ["-w", "10", "-W", "10"]),
    ],
    ids=["default-windows", "1KiB-windows"],
)
def test_h2load_unary_load(tmp_path: Path, method, body, answer, windows) -> None:  # type: ignore[no-untyped-def]
    _require_or_skip()
    request = tmp_path / "request.bin"
    request.write_bytes(message(body))

    async def main() -> str:
        server, _, port = await start()
        try:
            h2load = await asyncio.create_subprocess_exec(
                "h2load",
                *("-n", str(REQUESTS), "-c", "4", "-m", "32", *windows),
                *("-H", "content-type: application/grpc", "-H", "te: trailers"),
                *("-d", str(request), f"http://127.0.0.1:{port}/test.Echo/{method}"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(h2load.communicate(), 90)
            assert h2load.returncode == 0, out.decode()
            return out.decode()
        finally:
            await server.stop(0)

    report = asyncio.run(main())
    assert f"{REQUESTS} succeeded, 0 failed, 0 errored, 0 timeout" in report, report
    assert f"status codes: {REQUESTS} 2xx" in report, report
    data = re.search(r"traffic: .*?, .*? headers .*?, [\d.]+\w*B \((\d+)\) data", report)
    assert data is not None, report
    assert int(data.group(1)) == REQUESTS * answer  # every answer carried its whole message
