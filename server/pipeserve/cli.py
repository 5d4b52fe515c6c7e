"""argv -> Settings -> App. Subcommands: serve, health, split, pack."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeserve import __version__
from pipeserve.partition.cli import add_split_parser
from pipeserve.settings import (
    GRPC_FRONTENDS,
    MAX_MESSAGE_LIMIT,
    Settings,
    SettingsError,
    env_defaults,
)
from pipeserve.weights.pack import add_pack_parser


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # Environment values stay strings: argparse converts a string default with the flag's `type`
    # only when the flag is not given, so a bad PIPESERVE_* value fails like a bad flag (exit 2).
    env = env_defaults()
    p = sub.add_parser(
        "serve",
        help="serve the models of a repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model of a Triton-layout model repository. Each flag can also "
        "be set with the environment variable PIPESERVE_<FLAG> (e.g. PIPESERVE_GRPC_PORT).",
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=Path(env.get("model_repository", "models")),
        help="model repository folder (default: models)",
    )
    p.add_argument(
        "--host", default=env.get("host", "0.0.0.0"), help="address to listen on (default: 0.0.0.0)"
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=env.get("grpc_port", 8001),
        help="gRPC port; 0 picks a free one (default: 8001)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=env.get("metrics_port", 8002),
        help="Prometheus /metrics port; 0 picks a free one (default: 8002)",
    )
    p.add_argument(
        "--no-metrics",
        action="store_true",
        default=_env_flag(os.environ.get("PIPESERVE_NO_METRICS")),
        help="do not serve /metrics",
    )
    p.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default=env.get("model_control_mode", "none"),
        help="none: load all at start; poll: also rescan the repository; "
        "explicit: load/unload RPCs (default: none)",
    )
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=env.get("repository_poll_secs", 5.0),
        help="seconds between repository scans in poll mode (default: 5)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        dest="load_models",
        default=[m for m in env.get("load_model", "").split(",") if m] or None,
        help="model to load at start in explicit mode (repeatable; '*' = all)",
    )
    p.add_argument(
        "--log-level",
        default=env.get("log_level", "INFO"),
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default: INFO)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=env.get("max_message_bytes", MAX_MESSAGE_LIMIT),
        help=f"largest gRPC message accepted or sent (default: {MAX_MESSAGE_LIMIT}, gRPC's limit)",
    )
    p.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=env.get("exit_timeout_secs", 30.0),
        help="on SIGTERM/SIGINT, how long in-flight requests may take to finish (default: 30)",
    )
    p.add_argument(
        "--grpc-frontend",
        choices=GRPC_FRONTENDS,
        default=env.get("grpc_frontend", "asyncio"),
        help="gRPC transport: asyncio (pipeserve's own HTTP/2, several times less CPU per "
        "request) or grpcio (grpc.aio) (default: asyncio)",
    )
    p.set_defaults(func=_serve)


def _env_flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings(
            model_repository=args.model_repository,
            host=args.host,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            metrics=not args.no_metrics,
            model_control_mode=args.model_control_mode,
            repository_poll_secs=args.repository_poll_secs,
            load_models=tuple(args.load_models or ()),
            log_level=args.log_level,
            max_message_bytes=args.max_message_bytes,
            exit_timeout_secs=args.exit_timeout_secs,
            grpc_frontend=args.grpc_frontend,
        )
    except SettingsError as exc:
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return 2
    # After validation: logging raises on an unknown level.
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pipeserve.app import App  # heavy imports only when serving

    async def main() -> None:
        await App(settings).run_until_signalled()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _health_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("health", help="exit 0 when a pipeserve server reports SERVING")
    p.add_argument(
        "--address", default="localhost:8001", help="HOST:PORT (default: localhost:8001)"
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    p.set_defaults(func=_health)


def _health(args: argparse.Namespace) -> int:
    import grpc

    from pipeserve.api.generated import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"pipeserve health: {args.address}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"pipeserve health: {args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pipeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _health_parser(sub)
    add_split_parser(sub)
    add_pack_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
