"""What one peer, and all peers together, can make the own HTTP/2 transport hold or do.

One frozen `H2Limits` is given to `H2Server`; every connection and call reads its bounds from it.
The defaults follow grpc-core and nghttp2 where they have one (named per field), so a client that
works against either works here. docs/operations.md lists each limit with its server flag;
`h2_limits` builds one from the settings, `grpcio_limit_options` gives grpc.aio the same limits
where grpc-core has an option for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pipeserve.settings import Settings


@dataclass(frozen=True)
class H2Limits:
    # ---- per connection: streams, headers, output ---------------------------------------------
    # Advertised as SETTINGS_MAX_CONCURRENT_STREAMS; a stream past it gets RST_STREAM
    # REFUSED_STREAM (grpc-go and nghttp2 advertise 100, grpc-core leaves it open).
    max_concurrent_streams: int = 256
    # Advertised as SETTINGS_MAX_HEADER_LIST_SIZE; an encoded header block (HEADERS plus its
    # CONTINUATION frames) longer than it ends the connection with ENHANCE_YOUR_CALM before it
    # is decoded (grpc-core's hard metadata limit is 16 KiB).
    max_header_list_bytes: int = 16 << 10
    # CONTINUATION frames one header block may take (nghttp2: 8).
    max_continuations: int = 8
    # Response bytes a connection may hold because the peer's flow-control windows are shut.
    # While over it, new streams on that connection get REFUSED_STREAM (reading goes on: the
    # WINDOW_UPDATE that releases them has to be read).
    max_held_output_bytes: int = 16 << 20
    # Control answers (PING/SETTINGS ACKs, RST_STREAM) queued for a peer that does not read
    # them; past it the connection is closed with ENHANCE_YOUR_CALM (nghttp2: 1000).
    max_owed_control_frames: int = 1000

    # ---- server-wide ----------------------------------------------------------------------------
    # Open connections; one more is closed as soon as it is accepted.
    max_connections: int = 1024
    # Request bytes received (and inflated) by calls that have not finished, all connections
    # together; a new message past it is answered RESOURCE_EXHAUSTED at once.
    max_inflight_request_bytes: int = 4 << 30
    # A compressed message may inflate to this many bytes (and to no more than the message
    # limit, nor than what the in-flight limit has left); it is checked at each 1 MiB step of
    # the inflation, so a bomb never grows past it.
    max_decompressed_bytes: int = 256 << 20

    # ---- timeouts (seconds; 0 turns one off) ----------------------------------------------------
    # A connection that has not sent the HTTP/2 preface by then is closed.
    preface_timeout_s: float = 10.0
    # A connection without streams for this long gets GOAWAY and is closed (grpc-core's
    # max_connection_idle; off there by default).
    idle_timeout_s: float = 300.0
    # With nothing read for this long the server pings; no answer within keepalive_timeout_s
    # closes the connection (grpc-core: 2 hours and 20 seconds).
    keepalive_time_s: float = 7200.0
    keepalive_timeout_s: float = 20.0
    # A connection older than this gets GOAWAY (its calls finish; the client reconnects),
    # which spreads clients over servers behind a balancer (grpc-core's max_connection_age;
    # off by default, as there).
    max_connection_age_s: float = 0.0

    # ---- floods (grpc-core's ping policy, nghttp2's reset rate) ---------------------------------
    # A client PING sooner than this after the previous one, with no response data sent in
    # between, is a strike (grpc-core: 5 minutes; 2 hours while the connection has no
    # streams); more than max_ping_strikes strikes: GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    min_ping_interval_s: float = 300.0
    max_ping_strikes: int = 2
    # Streams the client may reset before they are answered: a bucket of reset_burst tokens,
    # refilled at reset_rate per second and by one per stream answered; empty: GOAWAY
    # ENHANCE_YOUR_CALM (nghttp2: 1000 and 33/s).
    reset_burst: int = 1000
    reset_rate: float = 33.0
    # Frames per second that cost work and carry no request: SETTINGS, PING, and empty frames
    # (DATA, HEADERS or CONTINUATION with no payload that end nothing, PRIORITY, unknown types).
    # Past one: GOAWAY ENHANCE_YOUR_CALM.
    max_settings_per_second: int = 100
    max_pings_per_second: int = 1000
    max_empty_frames_per_second: int = 1000
    # Entries one SETTINGS frame may carry (nghttp2: 32).
    max_settings_entries: int = 32

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value < 0 or (value == 0 and not field.name.endswith("_s")):
                raise ValueError(f"H2Limits.{field.name} must be > 0 (got {value})")
        if self.max_concurrent_streams > 2**31 - 1:
            raise ValueError("H2Limits.max_concurrent_streams must fit 31 bits")


def h2_limits(settings: Settings) -> H2Limits:
    """The own transport's limits from the settings: field `x` (or `x_s`) of H2Limits is
    setting `grpc_x` (or `grpc_x_secs`)."""
    values = {}
    for name in H2Limits.__dataclass_fields__:
        setting = "grpc_" + (name[:-2] + "_secs" if name.endswith("_s") else name)
        values[name] = getattr(settings, setting)
    return H2Limits(**values)


def grpcio_limit_options(settings: Settings) -> list[tuple[str, int]]:
    """The same limits for grpc.aio, where grpc-core has an option for them (0 = its default,
    which is also off for the timeouts)."""
    s = settings

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
        ("grpc.max_metadata_size", s.grpc_max_header_list_bytes),
        ("grpc.http2.max_ping_strikes", s.grpc_max_ping_strikes),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(s.grpc_min_ping_interval_secs)),
    ]
    for key, seconds in (
        ("grpc.server_handshake_timeout_ms", s.grpc_preface_timeout_secs),
        ("grpc.max_connection_idle_ms", s.grpc_idle_timeout_secs),
        ("grpc.keepalive_time_ms", s.grpc_keepalive_time_secs),
        ("grpc.keepalive_timeout_ms", s.grpc_keepalive_timeout_secs),
        ("grpc.max_connection_age_ms", s.grpc_max_connection_age_secs),
    ):
        if seconds:
            options.append((key, ms(seconds)))
    return options
