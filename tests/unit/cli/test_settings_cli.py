"""Settings and the command line: flags, PIPESERVE_* environment mirroring (flags win), validation
with clear messages and exit status 2, and `pipeserve health` exit codes."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeserve.cli import build_parser, main
from pipeserve.settings import MAX_MESSAGE_LIMIT, Settings, SettingsError, env_defaults
from tests import onnx_models as om
from tests.e2e.server import ServerProcess, serve_fails


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PIPESERVE_* variable of the machine running the tests leaks into them."""
    for key in list(os.environ):
        if key.startswith("PIPESERVE_"):
            monkeypatch.delenv(key)


def parse_serve(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", *argv])


# ---- flags and defaults -----------------------------------------------------------------------


def test_serve_defaults_follow_triton() -> None:
    args = parse_serve()
    assert args.model_repository == Path("models")
    assert args.host == "0.0.0.0"
    assert args.grpc_port == 8001
    assert args.metrics_port == 8002
    assert args.no_metrics is False
    assert args.model_control_mode == "none"
    assert args.repository_poll_secs == 5.0
    assert not args.load_models
    assert args.log_level == "INFO"
    assert args.max_message_bytes == MAX_MESSAGE_LIMIT == 2**31 - 1
    assert args.exit_timeout_secs == 30.0
    assert args.grpc_frontend == "asyncio"
    assert args.event_loop == "auto"


def test_server_name_and_strict_readiness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = parse_serve()
    assert (args.server_name, args.strict_readiness) == ("pipeserve", True)  # Triton: strict
    args = parse_serve("--server-name", "triton", "--strict-readiness", "false")
    assert (args.server_name, args.strict_readiness) == ("triton", False)
    assert parse_serve("--strict-readiness").strict_readiness is True
    monkeypatch.setenv("PIPESERVE_STRICT_READINESS", "0")
    assert parse_serve().strict_readiness is False
    with pytest.raises(SettingsError, match="server-name must not be empty"):
        Settings(model_repository=tmp_path, server_name=" ")


def test_every_serve_flag_is_parsed(tmp_path: Path) -> None:
    args = parse_serve(
        "--model-repository", str(tmp_path),
        "--host", "127.0.0.1",
        "--grpc-port", "9001",
        "--metrics-port", "9002",
        "--no-metrics",
        "--model-control-mode", "explicit",
        "--repository-poll-secs", "0.5",
        "--load-model", "a",
        "--load-model", "b",
        "--log-level", "debug",
        "--max-message-bytes", "4096",
        "--exit-timeout-secs", "2.5",
        "--grpc-frontend", "grpcio",
    )  # fmt: skip
    assert args.model_repository == tmp_path
    assert args.host == "127.0.0.1"
    assert (args.grpc_port, args.metrics_port) == (9001, 9002)
    assert args.no_metrics is True
    assert args.model_control_mode == "explicit"
    assert args.repository_poll_secs == 0.5
    assert args.load_models == ["a", "b"]
    assert args.log_level == "DEBUG"
    assert args.max_message_bytes == 4096
    assert args.exit_timeout_secs == 2.5
    assert args.grpc_frontend == "grpcio"


# ---- PIPESERVE_* environment ------------------------------------------------------------------

ENVIRONMENT = {
    "PIPESERVE_HOST": "127.0.0.2",
    "PIPESERVE_GRPC_PORT": "7001",
    "PIPESERVE_METRICS_PORT": "7002",
    "PIPESERVE_NO_METRICS": "true",
    "PIPESERVE_MODEL_CONTROL_MODE": "explicit",
    "PIPESERVE_REPOSITORY_POLL_SECS": "0.25",
    "PIPESERVE_LOAD_MODEL": "a,b",
    "PIPESERVE_LOG_LEVEL": "warning",
    "PIPESERVE_MAX_MESSAGE_BYTES": "8192",
    "PIPESERVE_EXIT_TIMEOUT_SECS": "3",
    "PIPESERVE_GRPC_FRONTEND": "grpcio",
}


def test_environment_mirrors_every_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIPESERVE_MODEL_REPOSITORY", str(tmp_path))
    for key, value in ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    args = parse_serve()
    assert args.model_repository == tmp_path
    assert args.host == "127.0.0.2"
    assert (args.grpc_port, args.metrics_port) == (7001, 7002)
    assert args.no_metrics is True
    assert args.model_control_mode == "explicit"
    assert args.repository_poll_secs == 0.25
    assert args.load_models == ["a", "b"]
    assert args.log_level == "WARNING"
    assert args.max_message_bytes == 8192
    assert args.exit_timeout_secs == 3.0
    assert args.grpc_frontend == "grpcio"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    args = parse_serve(
        "--grpc-port", "9001", "--model-control-mode", "poll", "--log-level", "ERROR"
    )  # fmt: skip
    assert args.grpc_port == 9001
    assert args.model_control_mode == "poll"
    assert args.log_level == "ERROR"
    assert args.metrics_port == 7002  # not given as a flag: the environment's


def test_a_flag_makes_a_bad_environment_value_irrelevant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPESERVE_GRPC_PORT", "abc")
    assert parse_serve("--grpc-port", "9001").grpc_port == 9001


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_no_metrics_environment_false_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PIPESERVE_NO_METRICS", value)
    assert parse_serve().no_metrics is False


def test_env_defaults_reads_only_pipeserve_variables() -> None:
    env = {"PIPESERVE_GRPC_PORT": "1", "GRPC_PORT": "2", "PIPESERVE_UNKNOWN": "3"}
    assert env_defaults(env) == {"grpc_port": "1"}


# ---- validation: clear messages, exit status 2 -------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port", "70000"], "grpc-port must be 0..65535, got 70000"),
        (["--metrics-port", "-1"], "metrics-port must be 0..65535, got -1"),
        (["--repository-poll-secs", "0"], "repository-poll-secs must be > 0"),
        (["--load-model", "a"], "--load-model needs --model-control-mode explicit"),
        (["--max-message-bytes", "10"], "max-message-bytes must be 1024.."),
        (["--exit-timeout-secs", "-1"], "exit-timeout-secs must be >= 0"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["serve", "--model-repository", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeserve: error: ")
    assert message in err


def test_missing_repository_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["serve", "--model-repository", str(missing)]) == 2
    assert f"model repository '{missing}' is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port", "abc"], "argument --grpc-port: invalid int value: 'abc'"),
        (["--model-control-mode", "sometimes"], "argument --model-control-mode: invalid choice"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
        (["--repository-poll-secs", "soon"], "invalid float value: 'soon'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--grpc-frontend", "h3"], "argument --grpc-frontend: invalid choice: 'h3'"),
        (["--event-loop", "trio"], "argument --event-loop: invalid choice: 'trio'"),
    ],
)
def test_unparseable_flags_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PIPESERVE_GRPC_PORT", "abc", "--grpc-port: invalid int value: 'abc'"),
        ("PIPESERVE_METRICS_PORT", "8o02", "--metrics-port: invalid int value: '8o02'"),
        ("PIPESERVE_REPOSITORY_POLL_SECS", "x", "--repository-poll-secs: invalid float value"),
        ("PIPESERVE_MAX_MESSAGE_BYTES", "lots", "--max-message-bytes: invalid int value"),
        ("PIPESERVE_EXIT_TIMEOUT_SECS", "never", "--exit-timeout-secs: invalid float value"),
        ("PIPESERVE_MODEL_CONTROL_MODE", "sometimes", "model-control-mode must be one of"),
        ("PIPESERVE_LOG_LEVEL", "loud", "log-level must be one of"),
        ("PIPESERVE_GRPC_PORT", "70000", "grpc-port must be 0..65535, got 70000"),
    ],
)
def test_bad_environment_values_exit_2_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    try:
        code = main(["serve", "--model-repository", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err


def test_settings_reject_bad_values_directly(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="model-control-mode must be one of"):
        Settings(model_repository=tmp_path, model_control_mode="sometimes")
    with pytest.raises(SettingsError, match="log-level must be one of"):
        Settings(model_repository=tmp_path, log_level="LOUD")
    with pytest.raises(SettingsError, match="grpc-frontend must be one of asyncio, grpcio"):
        Settings(model_repository=tmp_path, grpc_frontend="h3")
    with pytest.raises(SettingsError, match="event-loop must be one of auto, uvloop, asyncio"):
        Settings(model_repository=tmp_path, event_loop="trio")
    settings = Settings(model_repository=tmp_path, grpc_port=0, metrics_port=0)
    with pytest.raises(AttributeError):
        settings.grpc_port = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PIPESERVE_GRPC_PORT", "not-a-port", "invalid int value: 'not-a-port'"),
        ("PIPESERVE_LOG_LEVEL", "loud", "log-level must be one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_real_entry_point_reports_bad_values(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """The installed module, as a user runs it: message on stderr, exit 2, no traceback."""
    assert message in serve_fails(tmp_path, environ={variable: value})


# ---- pipeserve health -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("health_repo")
    om.write_model(repo, "scale", om.scale(2.0))
    proc = ServerProcess(repo, metrics=False).wait_ready()
    yield proc
    proc.stop()


def test_health_exits_0_against_a_serving_server(
    live_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--address", live_server.url]) == 0
    assert f"{live_server.url}: SERVING" in capsys.readouterr().out


def test_health_exits_1_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound socket that does not listen: connections to it are refused while we hold it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        assert main(["health", "--address", address, "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert address in out
    assert "UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out


def test_serve_exits_1_when_the_grpc_port_is_taken(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESERVE_")}
    done = subprocess.run(
        [
            sys.executable, "-m", "pipeserve", "serve",
            "--model-repository", str(tmp_path),
            "--host", "127.0.0.1",
            "--grpc-port", str(live_server.grpc_port),
            "--no-metrics", "--no-http",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot listen for gRPC on 127.0.0.1:{live_server.grpc_port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert main(["health", "--address", live_server.url]) == 0  # the first server is unharmed


# ---- one field table: every setting has a flag and a variable ----------------------------------


def test_every_setting_has_a_flag_and_a_documented_variable(tmp_path: Path) -> None:
    """The parser is built from Settings' fields: each one is a flag, mirrored by a variable
    that `serve --help` names, and parses back into Settings unchanged."""
    from pipeserve.cli.serve import settings_from_args
    from pipeserve.settings import env_name, flag_of, options

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name, opt, _ in options():
        assert flag_of(name, opt) in help_text
        assert env_name(name, opt).startswith("PIPESERVE_")
    args = parse_serve("--model-repository", str(tmp_path))
    assert settings_from_args(args, environ={}) == Settings(model_repository=tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PIPESERVE_GRPC_PORT", "abc", "(from the environment variable PIPESERVE_GRPC_PORT)"),
        ("PIPESERVE_GRPC_PORT", "70000", "(from the environment variable PIPESERVE_GRPC_PORT)"),
        (
            "PIPESERVE_MODEL_CONTROL_MODE",
            "sometimes",
            "must be one of none, poll, explicit, got 'sometimes' (from the environment "
            "variable PIPESERVE_MODEL_CONTROL_MODE)",
        ),
        ("PIPESERVE_NO_METRICS", "maybe", "PIPESERVE_NO_METRICS='maybe': expected one of"),
    ],
)
def test_a_bad_environment_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--model-repository", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_flag_value_does_not_blame_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPESERVE_GRPC_PORT", "70001")
    assert main(["serve", "--model-repository", str(tmp_path), "--grpc-port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "grpc-port must be 0..65535, got 70000" in err
    assert "environment" not in err


def test_help_speaks_to_users() -> None:
    top = build_parser().format_help()
    assert "Triton" in top and "->" not in top


def test_event_loop_uvloop_needs_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with pytest.raises(SettingsError, match="the uvloop package is not installed"):
        Settings(model_repository=tmp_path, event_loop="uvloop")
    assert Settings(model_repository=tmp_path, event_loop="auto").event_loop == "auto"
