"""Server settings: one field table, typed, validated at start-up, frozen.

Each field of `Settings` carries its command-line flag and help text (`option(...)`); the
`pipeserve serve` argument parser and the PIPESERVE_* environment mirroring are both built from
these fields (cli/serve.py), so a new setting is one field here plus its check in
`__post_init__`. Flags win over PIPESERVE_* variables, which win over the defaults; a bad value
fails before anything is served, naming the flag or the variable it came from.

A leaf module: it imports nothing heavy, and of pipeserve's only the leaf that parses
restriction rules.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeserve.restrictions import GROUPS as RESTRICTION_GROUPS
from pipeserve.restrictions import (
    GRPC_HEADER_PREFIX,
    RestrictionError,
    Restrictions,
    parse_restrictions,
)

# gRPC's own ceiling for one message (clients allow up to 2 GiB).
MAX_MESSAGE_LIMIT = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# asyncio: pipeserve's own HTTP/2 transport (api/h2); grpcio: grpc.aio, the reference one.
GRPC_FRONTENDS = ("asyncio", "grpcio")
# auto: uvloop where it is installed (a dependency on Linux and macOS), else asyncio's own loop.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# none: load all at start; poll: also rescan; explicit: load/unload RPCs.
CONTROL_MODES = ("none", "poll", "explicit")
ENV_PREFIX = "PIPESERVE_"


class SettingsError(ValueError):
    """A setting's value is invalid. `setting` names the field, so the command line can say
    whether the value came from a flag or from a PIPESERVE_* variable."""

    def __init__(self, message: str, setting: str = "") -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True, slots=True)
class Option:
    """How one setting appears on the command line.

    flag:    the flag (default: `--` + the field name with `-`); its PIPESERVE_* variable is the
             flag's name in upper case with `_` (`--no-metrics` -> PIPESERVE_NO_METRICS).
    negate:  a bool that defaults to True and is turned off by the flag (`--no-metrics`).
    repeat:  a tuple given by repeating the flag; its variable holds comma-separated values.
    upper:   the value is folded to upper case before the choices are checked.
    """

    help: str
    flag: str = ""
    choices: tuple[str, ...] = ()
    negate: bool = False
    repeat: bool = False
    upper: bool = False
    metavar: str | None = None


def option(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **kw)})


@dataclass(frozen=True, slots=True)
class Settings:
    model_repository: Path = option(
        Path("models"), "model repository folder (Triton's layout)", metavar="DIR"
    )
    host: str = option("0.0.0.0", "address to listen on")
    grpc_port: int = option(8001, "gRPC port; 0 picks a free one (the log names it)")
    http_port: int = option(
        8000, "HTTP/REST (KServe v2) port; 0 picks a free one (the log names it)"
    )
    http: bool = option(True, "do not serve HTTP/REST", flag="--no-http", negate=True)
    http_max_connections: int = option(
        1024,
        "HTTP: most connections (and requests in progress) at once; beyond it new requests are "
        "answered 503 at once",
    )
    http_max_header_bytes: int = option(
        64 * 1024, "HTTP: largest request line + headers; larger ones are answered 431"
    )
    http_keep_alive_secs: float = option(
        30.0, "HTTP: an idle keep-alive connection is closed after this many seconds"
    )
    metrics_port: int = option(8002, "Prometheus /metrics port; 0 picks a free one")
    metrics: bool = option(True, "do not serve /metrics", flag="--no-metrics", negate=True)
    model_control_mode: str = option(
        "none",
        "none: load every model at start; poll: also rescan the repository and load, reload or "
        "unload what changed; explicit: load and unload only on request",
        choices=CONTROL_MODES,
    )
    repository_poll_secs: float = option(5.0, "seconds between repository scans in poll mode")
    load_models: tuple[str, ...] = option(
        (),
        "explicit mode: a model to load at start (repeat the flag for more; '*' = every model)",
        flag="--load-model",
        repeat=True,
        metavar="NAME",
    )
    log_level: str = option("INFO", "log level", choices=LOG_LEVELS, upper=True)
    max_message_bytes: int = option(
        MAX_MESSAGE_LIMIT,
        "largest gRPC message or HTTP body (also once decompressed) accepted or sent; larger "
        "ones get RESOURCE_EXHAUSTED on gRPC, 413 on HTTP (the default is gRPC's own limit)",
    )
    exit_timeout_secs: float = option(
        30.0, "on SIGTERM/SIGINT, how long requests in flight may take to finish"
    )
    grpc_frontend: str = option(
        "asyncio",
        "gRPC transport: asyncio (pipeserve's own HTTP/2, several times less CPU per request) "
        "or grpcio (grpc.aio)",
        choices=GRPC_FRONTENDS,
    )
    event_loop: str = option(
        "auto",
        "event loop: uvloop (less CPU per request, most on HTTP/REST), asyncio (the standard "
        "library's), or auto: uvloop where it is installed",
        choices=EVENT_LOOPS,
    )
    # ---- what gRPC clients can make the server hold (api/h2/limits.py; docs/operations.md).
    # Each is a field of H2Limits named without the grpc_ prefix (_secs for its _s); the ones
    # grpc-core has an option for apply to --grpc-frontend grpcio too (marked "both").
    grpc_max_concurrent_streams: int = option(
        256, "streams one connection may have open; more get REFUSED_STREAM (both)"
    )
    grpc_max_header_list_bytes: int = option(
        16 << 10, "largest request header block, encoded or decoded (both)"
    )
    grpc_max_continuations: int = option(8, "CONTINUATION frames one header block may take")
    grpc_max_held_output_bytes: int = option(
        16 << 20,
        "answer bytes one connection may hold for a client whose windows are shut; past it new "
        "streams get REFUSED_STREAM",
    )
    grpc_max_owed_control_frames: int = option(
        1000, "PING/SETTINGS ACKs and refusals owed to a client that does not read; past it GOAWAY"
    )
    grpc_max_connections: int = option(
        1024, "open gRPC connections; one more is told GOAWAY and closed"
    )
    grpc_max_inflight_request_bytes: int = option(
        4 << 30,
        "request bytes held by calls in progress, server-wide; a request past it gets "
        "RESOURCE_EXHAUSTED at once",
    )
    grpc_max_decompressed_bytes: int = option(
        256 << 20,
        "size a compressed request may inflate to (checked while inflating); more: "
        "RESOURCE_EXHAUSTED",
    )
    grpc_preface_timeout_secs: float = option(
        10.0, "seconds a new connection has to send the HTTP/2 preface (both; 0: no limit)"
    )
    grpc_idle_timeout_secs: float = option(
        300.0, "seconds a connection without calls stays open; then GOAWAY (both; 0: for ever)"
    )
    grpc_keepalive_time_secs: float = option(
        7200.0, "seconds without input before the server pings the client (both; 0: never)"
    )
    grpc_keepalive_timeout_secs: float = option(
        20.0, "seconds the client has to answer that ping; then the connection is closed (both)"
    )
    grpc_max_connection_age_secs: float = option(
        0.0, "seconds after which a connection gets GOAWAY and the client reconnects (both; 0: off)"
    )
    grpc_min_ping_interval_secs: float = option(
        300.0,
        "a client PING sooner than this after the last one, with no answer sent between, is a "
        "strike (both)",
    )
    grpc_max_ping_strikes: int = option(
        2, "strikes tolerated; one more: GOAWAY ENHANCE_YOUR_CALM too_many_pings (both)"
    )
    grpc_reset_burst: int = option(
        1000, "streams a client may reset before they are answered (rapid reset bucket)"
    )
    grpc_reset_rate: float = option(33.0, "per second, how fast that bucket refills")
    grpc_max_settings_per_second: int = option(
        100, "SETTINGS frames a connection may send a second"
    )
    grpc_max_pings_per_second: int = option(1000, "PING frames a connection may send a second")
    grpc_max_empty_frames_per_second: int = option(
        1000,
        "empty DATA/HEADERS/CONTINUATION, PRIORITY and unknown frames a connection may send in "
        "a second",
    )
    grpc_max_settings_entries: int = option(32, "entries one SETTINGS frame may carry")
    # TLS (api/tls.py): the files are read and checked when the server is built; SIGHUP
    # rereads them.
    grpc_tls_cert: Path | None = option(
        None,
        "serve gRPC over TLS with this PEM certificate chain (needs --grpc-tls-key)",
        metavar="FILE",
    )
    grpc_tls_key: Path | None = option(None, "PEM private key of --grpc-tls-cert", metavar="FILE")
    grpc_tls_client_ca: Path | None = option(
        None,
        "mutual TLS: require a client certificate signed by a CA in this PEM file",
        metavar="FILE",
    )
    metrics_tls_cert: Path | None = option(
        None,
        "serve /metrics over https with this PEM certificate chain (needs --metrics-tls-key)",
        metavar="FILE",
    )
    metrics_tls_key: Path | None = option(
        None, "PEM private key of --metrics-tls-cert", metavar="FILE"
    )
    metrics_tls_client_ca: Path | None = option(
        None,
        "mutual TLS on /metrics: require a client certificate signed by a CA in this file",
        metavar="FILE",
    )
    http_tls_cert: Path | None = option(
        None,
        "serve HTTP/REST over https with this PEM certificate chain (needs --http-tls-key)",
        metavar="FILE",
    )
    http_tls_key: Path | None = option(None, "PEM private key of --http-tls-cert", metavar="FILE")
    http_tls_client_ca: Path | None = option(
        None,
        "mutual TLS on HTTP/REST: require a client certificate signed by a CA in this file",
        metavar="FILE",
    )
    # Restricted protocol groups (pipeserve/restrictions.py), Triton's flag syntax.
    grpc_restricted_protocol: tuple[str, ...] = option(
        (),
        "RPC groups that require a header: '<group>[,<group>...]:<key>=<value>' makes them "
        "answer only calls with the header 'triton-grpc-protocol-<key>: <value>' "
        f"(groups: {', '.join(RESTRICTION_GROUPS)}; repeat for more rules)",
        repeat=True,
        metavar="GROUPS:KEY=VALUE",
    )
    grpc_disable_protocol: tuple[str, ...] = option(
        (),
        "RPC groups turned off: every call of them gets PERMISSION_DENIED "
        "('<group>[,<group>...]'; repeatable)",
        repeat=True,
        metavar="GROUPS",
    )

    http_restricted_api: tuple[str, ...] = option(
        (),
        "HTTP/REST API groups that require a header: '<group>[,<group>...]:<key>=<value>' "
        "makes them answer only requests with the header '<key>: <value>' (the groups of "
        "--grpc-restricted-protocol; repeat for more rules)",
        repeat=True,
        metavar="GROUPS:KEY=VALUE",
    )
    http_disable_api: tuple[str, ...] = option(
        (),
        "HTTP/REST API groups turned off: every request of them gets 403 "
        "('<group>[,<group>...]'; repeatable)",
        repeat=True,
        metavar="GROUPS",
    )

    server_name: str = option(
        "pipeserve",
        "the name ServerMetadata answers (clients written for Triton may check for 'triton')",
        metavar="NAME",
    )
    strict_readiness: bool = option(
        True,
        "server readiness (ServerReady, gRPC health) also needs every model that should be "
        "loaded to be READY, as in Triton; false: ready once the server is up",
    )

    def __post_init__(self) -> None:
        if not self.model_repository.is_dir():
            raise SettingsError(
                f"model repository '{self.model_repository}' is not a directory",
                "model_repository",
            )
        for name in ("grpc_port", "metrics_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SettingsError(f"{_flag(name)} must be 0..65535, got {port}", name)
        _check_choice(self, "model_control_mode")
        if self.repository_poll_secs <= 0:
            raise SettingsError(
                f"repository-poll-secs must be > 0, got {self.repository_poll_secs}",
                "repository_poll_secs",
            )
        if self.load_models and self.model_control_mode != "explicit":
            raise SettingsError("--load-model needs --model-control-mode explicit", "load_models")
        _check_choice(self, "log_level", self.log_level.upper())
        if not 1024 <= self.max_message_bytes <= MAX_MESSAGE_LIMIT:
            raise SettingsError(
                f"max-message-bytes must be 1024..{MAX_MESSAGE_LIMIT}, "
                f"got {self.max_message_bytes}",
                "max_message_bytes",
            )
        _check_choice(self, "grpc_frontend")
        _check_choice(self, "event_loop")
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise SettingsError(
                "event-loop uvloop: the uvloop package is not installed "
                "(pip install uvloop, or --event-loop asyncio)",
                "event_loop",
            )
        if not self.server_name.strip():
            raise SettingsError("server-name must not be empty", "server_name")
        if self.http_max_connections < 1:
            raise SettingsError(
                f"http-max-connections must be >= 1, got {self.http_max_connections}",
                "http_max_connections",
            )
        if self.http_max_header_bytes < 1024:
            raise SettingsError(
                f"http-max-header-bytes must be >= 1024, got {self.http_max_header_bytes}",
                "http_max_header_bytes",
            )
        if self.http_keep_alive_secs < 1:
            raise SettingsError(
                f"http-keep-alive-secs must be >= 1, got {self.http_keep_alive_secs}",
                "http_keep_alive_secs",
            )
        if self.exit_timeout_secs < 0:
            raise SettingsError(
                f"exit-timeout-secs must be >= 0, got {self.exit_timeout_secs}",
                "exit_timeout_secs",
            )
        for name in transport_limit_names():
            value = getattr(self, name)
            if name.endswith("_secs") and value < 0:
                raise SettingsError(f"{_flag(name)} must be >= 0, got {value}", name)
            if not name.endswith("_secs") and value <= 0:
                raise SettingsError(f"{_flag(name)} must be > 0, got {value}", name)
        if self.grpc_max_concurrent_streams > 2**31 - 1:
            raise SettingsError(
                "grpc-max-concurrent-streams must fit 31 bits", "grpc_max_concurrent_streams"
            )
        for endpoint in ("grpc", "metrics", "http"):
            cert, key, ca = (f"{endpoint}_tls_{part}" for part in ("cert", "key", "client_ca"))
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                given, missing = (cert, key) if getattr(self, cert) is not None else (key, cert)
                raise SettingsError(f"--{_flag(given)} needs --{_flag(missing)}", missing)
            if getattr(self, ca) is not None and getattr(self, cert) is None:
                raise SettingsError(f"--{_flag(ca)} needs --{_flag(cert)} and --{_flag(key)}", ca)
        try:
            self.grpc_restrictions()
            self.http_restrictions()
        except RestrictionError as exc:
            raise SettingsError(str(exc), exc.flag.replace("-", "_")) from None

    def grpc_restrictions(self) -> Restrictions:
        """The parsed --grpc-restricted-protocol and --grpc-disable-protocol rules."""
        return parse_restrictions(
            self.grpc_restricted_protocol,
            self.grpc_disable_protocol,
            header_prefix=GRPC_HEADER_PREFIX,
            restricted_flag="grpc-restricted-protocol",
            disabled_flag="grpc-disable-protocol",
        )

    def http_restrictions(self) -> Restrictions:
        """The parsed --http-restricted-api and --http-disable-api rules (bare header keys)."""
        return parse_restrictions(
            self.http_restricted_api,
            self.http_disable_api,
            header_prefix="",
            restricted_flag="http-restricted-api",
            disabled_flag="http-disable-api",
            noun="API",
        )


def transport_limit_names() -> tuple[str, ...]:
    """The settings that bound what gRPC clients can make the server hold: one per field of
    api/h2's H2Limits (tests/unit/api/h2/test_h2_limits_settings.py keeps the two in step)."""
    return _TRANSPORT_LIMITS


_TRANSPORT_LIMITS = (
    "grpc_max_concurrent_streams",
    "grpc_max_header_list_bytes",
    "grpc_max_continuations",
    "grpc_max_held_output_bytes",
    "grpc_max_owed_control_frames",
    "grpc_max_connections",
    "grpc_max_inflight_request_bytes",
    "grpc_max_decompressed_bytes",
    "grpc_preface_timeout_secs",
    "grpc_idle_timeout_secs",
    "grpc_keepalive_time_secs",
    "grpc_keepalive_timeout_secs",
    "grpc_max_connection_age_secs",
    "grpc_min_ping_interval_secs",
    "grpc_max_ping_strikes",
    "grpc_reset_burst",
    "grpc_reset_rate",
    "grpc_max_settings_per_second",
    "grpc_max_pings_per_second",
    "grpc_max_empty_frames_per_second",
    "grpc_max_settings_entries",
)


def options() -> list[tuple[str, Option, Any]]:
    """(field name, its Option, its default) for every setting, in declaration order."""
    # Every field has a plain default (option() sets one; tuples are immutable).
    return [(f.name, f.metadata["option"], f.default) for f in fields(Settings)]


def flag_of(name: str, opt: Option) -> str:
    return opt.flag or "--" + name.replace("_", "-")


def env_name(name: str, opt: Option) -> str:
    return ENV_PREFIX + flag_of(name, opt).removeprefix("--").replace("-", "_").upper()


def env_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """PIPESERVE_GRPC_PORT=8001 -> {"grpc_port": "8001"} for every known setting (keyed by the
    variable's name without the prefix, in lower case)."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name, opt, _ in options():
        variable = env_name(name, opt)
        if variable in environ:
            out[variable.removeprefix(ENV_PREFIX).lower()] = environ[variable]
    return out


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(settings: Settings, name: str, value: str | None = None) -> None:
    opt: Option = Settings.__dataclass_fields__[name].metadata["option"]
    value = getattr(settings, name) if value is None else value
    if value not in opt.choices:
        raise SettingsError(
            f"{_flag(name)} must be one of {', '.join(opt.choices)}, got '{value}'", name
        )
