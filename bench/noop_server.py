"""A do-nothing inference server: the gRPC ceiling of a Python server on this machine.

It speaks the same protocol as pipeserve (grpc.aio, the same generated messages and codec),
decodes each ModelInfer request into numpy and answers with a zero output of the right shape,
without queueing, batching or executing anything. Whatever throughput it reaches is the most any
Python grpc.aio server can reach here for that message size, so pipeserve is compared with it.

    .venv/bin/python bench/noop_server.py --model mlp --features 512 --outputs 512
prints `noop listening: <port>` and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from pipeserve.api.codec import decode_request, encode_response
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.generated import grpc_service_pb2_grpc as pb_grpc
from pipeserve.api.generated import model_config_pb2 as mc
from pipeserve.inference import InferResponse, ModelSpec, TensorSpec


class NoopService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, features: int, outputs: int) -> None:
        self.spec = ModelSpec(
            model,
            1,
            32,
            (TensorSpec("x", "FP32", (features,)),),
            (TensorSpec("y", "FP32", (outputs,)),),
        )
        self.outputs = outputs
        config = mc.ModelConfig(name=model, max_batch_size=32, platform="onnxruntime_onnx")
        config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[features])
        config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[outputs])
        self.config = config

    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerMetadataResponse(name="noop", version="0", extensions=[])

    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        response = pb.ModelMetadataResponse(name=self.spec.name, versions=["1"])
        for tensors, target in (
            (self.spec.inputs, response.inputs),
            (self.spec.outputs, response.outputs),
        ):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
        return response

    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelConfigResponse(config=self.config)

    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        decoded = decode_request(request)
        rows = next(iter(decoded.inputs.values())).shape[0]
        response = InferResponse(
            decoded.model_name,
            "1",
            decoded.request_id,
            {"y": np.zeros((rows, self.outputs), dtype=np.float32)},
        )
        return encode_response(response, self.spec)


async def serve(model: str, features: int, outputs: int, frontend: str) -> None:
    if frontend == "asyncio":
        from pipeserve.api.h2.server import H2Server

        h2 = H2Server(1 << 30, 1 << 30)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            NoopService(model, features, outputs), h2
        )
        port = h2.add_insecure_port("127.0.0.1:0")
        await h2.start()
        print(f"noop listening: {port}", flush=True)
        await asyncio.Event().wait()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        NoopService(model, features, outputs), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"noop listening: {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--frontend", choices=["grpcio", "asyncio"], default="grpcio")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.model, args.features, args.outputs, args.frontend))


if __name__ == "__main__":
    main()
