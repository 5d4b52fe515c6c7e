"""pipeserve's own gRPC transport: HTTP/2 (h2c) on asyncio, serving grpc.aio-style servicers.

frames.py (wire encodings) <- connection.py (HTTP/2: streams, flow control) <- calls.py (gRPC:
messages, deadlines, status) <- server.py (listen, dispatch, drain).
"""
