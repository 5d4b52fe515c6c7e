"""uvloop against asyncio's own event loop: the same pipeserve code, `--event-loop` the only
difference, both servers up at once and measured in alternating rounds.

Add-one model (the vs_triton.py config), perf_analyzer in its default sync mode at concurrency
32, over gRPC and over HTTP/REST: throughput and the server's CPU microseconds per request
(process CPU time from /proc/<pid>/stat over the requests its ModelStatistics counted). Medians
over rounds; the ratio column is uvloop / asyncio.

    .venv/bin/python bench/event_loop.py --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import _free_port, serve_command, started  # noqa: E402
from loadgen import run_perf_analyzer  # noqa: E402
from vs_triton import add_one, answered, write_pipeserve_repository  # noqa: E402

LOOPS = ("asyncio", "uvloop")
PROTOCOLS = ("grpc", "http")


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per perf window")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {"add_one": add_one(root / "a.onnx")})
        servers: dict[str, tuple[int, int, int]] = {}  # loop -> (grpc port, http port, pid)
        for loop in LOOPS:
            grpc_port, http_port = _free_port(), _free_port()
            cmd = [a for a in serve_command(repo) if a != "--no-http"]
            cmd[cmd.index("--grpc-port") + 1] = str(grpc_port)
            cmd += ["--http-port", str(http_port), "--event-loop", loop]
            _, pid = stack.enter_context(started(cmd, "pipeserve ready", r"grpc=\S+:(\d+)"))
            servers[loop] = (grpc_port, http_port, pid)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            order = LOOPS if r % 2 == 0 else LOOPS[::-1]
            for protocol in PROTOCOLS:
                for loop in order:
                    grpc_port, http_port, pid = servers[loop]
                    stats_url = f"127.0.0.1:{grpc_port}"
                    port = grpc_port if protocol == "grpc" else http_port
                    cpu0, n0 = process_cpu(pid), answered(stats_url, "add_one")
                    load = run_perf_analyzer(
                        f"127.0.0.1:{port}", "add_one", args.concurrency, args.window, "x:16",
                        mode="sync", protocol=protocol,
                    )  # fmt: skip
                    cpu1, n1 = process_cpu(pid), answered(stats_url, "add_one")
                    us = (cpu1 - cpu0) / (n1 - n0) * 1e6
                    results.setdefault((protocol, loop), []).append((load.throughput, us))
                    print(f"round {r} {protocol} {loop}: {load.throughput:,.0f}/s, "
                          f"{us:.0f} us/req", flush=True)  # fmt: skip
        print(f"\n| concurrency {args.concurrency} (medians of {args.rounds}) | asyncio | uvloop "
              "| uvloop / asyncio |\n|---|---:|---:|---:|")  # fmt: skip
        for protocol in PROTOCOLS:
            for i, what in ((0, "infer/s"), (1, "server CPU us per request")):
                a, u = (
                    statistics.median(x[i] for x in results[(protocol, loop)]) for loop in LOOPS
                )
                print(f"| {protocol}: {what} | {a:,.0f} | {u:,.0f} | {u / a:.2f} |")


if __name__ == "__main__":
    main()
