"""`pipeserve health`: exit 0 when a server's grpc.health.v1.Health service says SERVING (the
Docker HEALTHCHECK uses it). Imports grpc only, never onnxruntime."""

from __future__ import annotations

import argparse


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
    p.set_defaults(func=health)


def health(args: argparse.Namespace) -> int:
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
