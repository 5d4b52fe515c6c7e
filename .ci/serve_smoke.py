"""Serve models/ and answer one inference, with no tritonclient in the environment.

.ci/run runs this after installing the oldest protobuf pyproject allows, to prove the generated
code imports and serves on it (the newest tritonclient's own generated code needs a newer
protobuf, so this check talks through pipeserve's generated stubs instead). Exit 0 on success.

    python .ci/serve_smoke.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import __version__ as protobuf_version

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeserve.api.generated import grpc_service_pb2, grpc_service_pb2_grpc  # noqa: E402
from tests.e2e.server import ServerProcess  # noqa: E402


def main() -> int:
    server = ServerProcess(REPO_ROOT / "models").wait_ready()
    try:
        health = [sys.executable, "-m", "pipeserve", "health", "--address", server.url]
        subprocess.run(health, check=True)
        a = np.arange(16, dtype=np.float32)
        request = grpc_service_pb2.ModelInferRequest(model_name="add_sub")
        for name in ("INPUT0", "INPUT1"):
            request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
            request.raw_input_contents.append(a.tobytes())
        with grpc.insecure_channel(server.url) as channel:
            reply = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        index = [o.name for o in reply.outputs].index("OUTPUT0")
        total = np.frombuffer(reply.raw_output_contents[index], dtype=np.float32)
        if not np.array_equal(total, a + a):
            print(f"add_sub answered {total}, expected {a + a}", file=sys.stderr)
            return 1
    finally:
        server.stop()
    print(f"protobuf {protobuf_version}: pipeserve served models/ and answered add_sub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
