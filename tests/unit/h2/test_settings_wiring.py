"""Every limit of the own transport is a server flag (and PIPESERVE_* variable), the flags reach
H2Server and grpc.aio, and the real server advertises what it was told."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.limits import H2Limits, grpcio_limit_options, h2_limits
from pipeserve.cli import build_parser
from pipeserve.cli.serve import settings_from_args
from pipeserve.settings import Settings, SettingsError, transport_limit_names
from tests.e2e.server import ServerProcess


def parse_serve(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", *argv])


def test_every_limit_has_a_setting_with_the_same_default(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path)
    assert h2_limits(settings) == H2Limits()
    mapped = {
        "grpc_" + (n[:-2] + "_secs" if n.endswith("_s") else n)
        for n in H2Limits.__dataclass_fields__
    }
    assert mapped == set(transport_limit_names())


def test_flags_reach_the_limits(tmp_path: Path) -> None:
    args = parse_serve(
        "--model-repository", str(tmp_path),
        "--grpc-max-concurrent-streams", "8",
        "--grpc-idle-timeout-secs", "0",
        "--grpc-max-inflight-request-bytes", "1048576",
        "--grpc-reset-rate", "5.5",
    )  # fmt: skip
    limits = h2_limits(settings_from_args(args, environ={}))
    assert limits.max_concurrent_streams == 8
    assert limits.idle_timeout_s == 0
    assert limits.max_inflight_request_bytes == 1 << 20
    assert limits.reset_rate == 5.5


def test_environment_reaches_the_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPESERVE_GRPC_MAX_CONNECTIONS", "7")
    monkeypatch.setenv("PIPESERVE_GRPC_KEEPALIVE_TIME_SECS", "60")
    args = parse_serve("--model-repository", str(tmp_path))
    limits = h2_limits(settings_from_args(args))
    assert (limits.max_connections, limits.keepalive_time_s) == (7, 60.0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("grpc_max_concurrent_streams", 0, "grpc-max-concurrent-streams must be > 0"),
        ("grpc_idle_timeout_secs", -1.0, "grpc-idle-timeout-secs must be >= 0"),
        ("grpc_reset_rate", 0.0, "grpc-reset-rate must be > 0"),
    ],
)
def test_bad_limits_are_refused_naming_the_flag(
    tmp_path: Path, name: str, value: float, message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(model_repository=tmp_path, **{name: value})  # type: ignore[arg-type]


def test_grpcio_gets_the_limits_grpc_core_has_options_for(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        Settings(model_repository=tmp_path),
        grpc_idle_timeout_secs=0,
        grpc_max_connection_age_secs=30,
    )
    options = dict(grpcio_limit_options(settings))
    assert options["grpc.max_concurrent_streams"] == 256
    assert options["grpc.max_metadata_size"] == 16 << 10
    assert options["grpc.keepalive_time_ms"] == 7_200_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 30_000
    assert "grpc.max_connection_idle_ms" not in options  # 0: off, grpc-core's own default


def test_the_real_server_advertises_and_applies_its_flags(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path,
        "--grpc-max-concurrent-streams", "3",
        "--grpc-max-header-list-bytes", "4096",
        "--grpc-idle-timeout-secs", "0.5",
        metrics=False,
    ).wait_ready()  # fmt: skip
    try:

        async def main() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.grpc_port)
            writer.write(f.PREFACE + f.settings({}))
            head = await asyncio.wait_for(reader.readexactly(9), 10)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            advertised = dict(f.parse_settings(payload))
            assert advertised[f.MAX_CONCURRENT_STREAMS] == 3
            assert advertised[f.MAX_HEADER_LIST_SIZE] == 4096
            rest = await asyncio.wait_for(reader.read(), 10)  # idle: GOAWAY, then closed
            assert f.goaway(0, f.NO_ERROR) in rest
            writer.close()
            await writer.wait_closed()

        asyncio.run(main())
    finally:
        server.stop()
