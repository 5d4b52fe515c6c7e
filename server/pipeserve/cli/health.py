"""`pipeserve health`: exit 0 when a server's grpc.health.v1.Health service says SERVING (the
Docker HEALTHCHECK uses it). Imports grpc only, never onnxruntime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def add_health_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "health",
        help="exit 0 when a pipeserve server reports SERVING",
        description="Ask a running server's gRPC health service whether it is SERVING: exit 0 "
        "if it is, 1 if it is not or cannot be reached.",
    )
    p.add_argument(
        "--address", default="localhost:8001", help="HOST:PORT (default: localhost:8001)"
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    p.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="speak TLS, verifying the server with the CA certificates in this PEM file",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="key of --tls-cert")
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the server certificate must carry, when not the host of --address",
    )
    p.set_defaults(func=health)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    import grpc

    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise ValueError("--tls-cert and --tls-key need --tls-ca")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    files = [args.tls_ca, args.tls_key, args.tls_cert]
    ca, key, cert = (None if path is None else _read(path) for path in files)
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, credentials, options)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read '{path}': {exc.strerror or exc}") from None


def health(args: argparse.Namespace) -> int:
    import grpc

    from pipeserve.api.generated import health_pb2, health_pb2_grpc

    try:
        channel = _channel(args)
    except ValueError as exc:
        print(f"pipeserve health: error: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"pipeserve health: {args.address}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"pipeserve health: {args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
