"""Server CPU per request of several checkouts, same run: the before/after measure of a change
on the request path (issue 15's "per-request cost").

One `pipeserve serve` per checkout, all up at once, each serving the add-one model of
bench/vs_triton.py (`max_batch_size: 32`, delay 0, one CPU instance). Each round drives every
server in turn (the order flips every round) with perf_analyzer in its default sync mode at
concurrency 32 and divides the server process's CPU time over that run by the requests its
statistics counted. Medians over rounds. `--protocol http` drives the REST endpoint instead
(perf_analyzer `-i http`, binary tensors); `--streaming`, gRPC's ModelStreamInfer (one stream
per perf_analyzer context). `--model pool --concurrency 8` sends a 602 KB image per request to
a model that only averages it (vs_triton.py's `pool`): the cost of a large tensor; `--model
image`, the same image answered back (Identity): a large tensor each way.

    .venv/bin/python bench/request_cost.py --rounds 3 --src /work/wt/base --src .

A checkout is any folder holding `server/` (`git worktree add --detach DIR COMMIT` makes one).
`--in-process` measures the same path without sockets or a load generator: the real server
objects (App, HTTP/2 connection, data plane, batcher, onnxruntime) fed bursts of 32 ModelInfer
calls, in reads of at most 256 KiB as uvloop's socket reads give them, on a transport that
discards what is written: the Python work alone, far less noisy (`--model` applies here too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402
from vs_triton import (  # noqa: E402
    BUILDERS,
    MODELS,
    answered,
    cpu_seconds,
    write_pipeserve_repository,
)


def serve(repository: Path, protocol: str) -> tuple[list[str], str]:
    cmd = [
        sys.executable, "-m", "pipeserve", "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--no-metrics",
        *(["--http-port", "0"] if protocol == "http" else ["--no-http"]),
    ]  # fmt: skip
    return cmd, (r"http=\S+:(\d+)" if protocol == "http" else r"grpc=\S+:(\d+)")


def count(url: str, protocol: str, model: str) -> int:
    if protocol == "grpc":
        return answered(url, model)
    client = httpclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)
        return int(stats["model_stats"][0]["inference_count"])
    finally:
        client.close()


def over_sockets(
    sources: list[Path],
    protocol: str,
    rounds: int,
    window: float,
    streaming: bool = False,
    model: str = "add_one",
    concurrency: int = 32,
) -> None:
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")
    shape = f"x:{','.join(str(d) for d in MODELS[model][0])}"
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {model: BUILDERS[model](root / "m.onnx")})
        cmd, pattern = serve(repo, protocol)
        servers = [
            stack.enter_context(
                started(cmd, "pipeserve ready", pattern, dict(os.environ, PYTHONPATH=f"{s}/server"))
            )
            for s in sources
        ]
        seen: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(sources))}
        for r in range(rounds):
            order = list(range(len(sources)))
            for i in order if r % 2 == 0 else order[::-1]:
                port, pid = servers[i]
                url = f"127.0.0.1:{port}"
                cpu0, n0 = cpu_seconds(pid), count(url, protocol, model)
                load = run_perf_analyzer(
                    url,
                    model,
                    concurrency,
                    window,
                    shape,
                    mode="sync",
                    streaming=streaming,
                    protocol=protocol,
                )
                cpu1, n1 = cpu_seconds(pid), count(url, protocol, model)
                us = (cpu1 - cpu0) / max(n1 - n0, 1) * 1e6
                seen[i].append((us, load.throughput))
                print(f"r{r} {sources[i]}: {load.throughput:,.0f} infer/s, {us:.1f} us CPU/request",
                      flush=True)  # fmt: skip
        print(f"\n| checkout | {protocol} infer/s | CPU us/request |\n|---|---:|---:|")
        for i, src in enumerate(sources):
            us = statistics.median(x[0] for x in seen[i])
            rate = statistics.median(x[1] for x in seen[i])
            print(f"| {src} | {rate:,.0f} | {us:.1f} |")


# Run in a child interpreter whose PYTHONPATH picks the checkout under test.
CHILD = r"""
import argparse, asyncio, json, sys, tempfile, time
from pathlib import Path
import hpack, numpy as np
sys.path.insert(0, sys.argv[2])
from null_transport import NullTransport
from vs_triton import BUILDERS, MODELS, write_pipeserve_repository
from pipeserve.api.generated import grpc_service_pb2 as pb
from pipeserve.api.h2 import frames as f
from pipeserve.app import App
from pipeserve.cli.serve import add_serve_parser, settings_from_args

CALLS, MODEL, BATCH, READ = int(sys.argv[1]), sys.argv[3], 32, 256 << 10
HEADERS = [(":method", "POST"), (":scheme", "http"),
           (":path", "/inference.GRPCInferenceService/ModelInfer"),
           (":authority", "127.0.0.1"), ("te", "trailers"),
           ("content-type", "application/grpc"), ("user-agent", "grpc-c++/1.57.0")]

def message():
    dims = MODELS[MODEL][0]
    msg = pb.ModelInferRequest(model_name=MODEL)
    msg.inputs.add(name="x", datatype="FP32", shape=[1, *dims])
    msg.raw_input_contents.append(np.ones(dims, np.float32).tobytes())
    body = msg.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body

def burst(encoder, body, first_id):
    # BATCH calls, cut into reads of at most READ bytes (what a socket read gives)
    data = b"".join(
        f.frame(f.HEADERS, f.END_HEADERS, sid, encoder.encode(HEADERS))
        + f.frame(f.DATA, f.END_STREAM, sid, body)
        for sid in range(first_id, first_id + 2 * BATCH, 2)
    )
    return [data[i : i + READ] for i in range(0, len(data), READ)]

async def main():
    root = Path(tempfile.mkdtemp())
    repo = write_pipeserve_repository(
        root / "repo", {MODEL: BUILDERS[MODEL](root / "m.onnx")})
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                              "--grpc-port", "0", "--no-metrics", "--no-http"])
    app = App(settings_from_args(args))
    await app.start()
    body, encoder = message(), hpack.Encoder()
    conn = app.server._connection()
    conn.connection_made(NullTransport())
    conn.data_received(f.PREFACE + f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
                       + f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
    await asyncio.sleep(0)
    spent = 0.0
    for first in range(1, 2 * CALLS, 2 * BATCH):
        reads = burst(encoder, body, first)  # made outside the timed part
        start = time.process_time()
        for data in reads:
            conn.data_received(data)
        while conn.streams:  # every call of this burst answered
            await asyncio.sleep(0)
        spent += time.process_time() - start
    print(json.dumps({"us_per_call": spent / CALLS * 1e6}), flush=True)
    await app.stop()

import uvloop
uvloop.run(main())
"""


def in_process(sources: list[Path], rounds: int, calls: int, model: str = "add_one") -> None:
    bench = str(Path(__file__).resolve().parent)
    seen: dict[int, list[float]] = {i: [] for i in range(len(sources))}
    for r in range(rounds):
        order = list(range(len(sources)))
        for i in order if r % 2 == 0 else order[::-1]:
            env = dict(os.environ, PYTHONPATH=f"{sources[i]}/server")
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(calls), bench, model],
                capture_output=True, text=True, env=env, timeout=600, check=True,
            )  # fmt: skip
            line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
            us = float(json.loads(line)["us_per_call"])
            seen[i].append(us)
            print(f"r{r} {sources[i]}: {us:.2f} us CPU per call", flush=True)
    print("\n| checkout | CPU us per ModelInfer call, in process |\n|---|---:|")
    for i, src in enumerate(sources):
        print(f"| {src} | {statistics.median(seen[i]):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--src", type=Path, action="append", required=True, help="checkout with server/ (repeat)"
    )
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--streaming", action="store_true", help="gRPC ModelStreamInfer")
    parser.add_argument("--model", choices=sorted(BUILDERS), default="add_one")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per perf window")
    parser.add_argument("--in-process", action="store_true", help="no sockets (see above)")
    parser.add_argument("--calls", type=int, default=30_000, help="calls per in-process run")
    args = parser.parse_args()
    sources = [s.resolve() for s in args.src]
    started_at = time.monotonic()
    if args.in_process:
        in_process(sources, args.rounds, args.calls, args.model)
    else:
        if args.streaming and args.protocol != "grpc":
            parser.error("--streaming is gRPC's (ModelStreamInfer)")
        over_sockets(
            sources,
            args.protocol,
            args.rounds,
            args.window,
            args.streaming,
            args.model,
            args.concurrency,
        )
    print(f"\n({time.monotonic() - started_at:.0f} s)")


if __name__ == "__main__":
    main()
