"""CPU per unary call of the own HTTP/2 transport alone, as a client like grpc-core drives it:
the same bytes (preface, SETTINGS, then HEADERS + DATA per call, the header block HPACK-indexed
after the first call) are fed to `Connection.data_received` in batches of 64 calls, and every
call is answered at once with a fixed response and trailers (the cheapest possible handler).
What remains is the transport's own work: frame parsing, the RFC 9113 checks, header-block
decoding (cached), stream bookkeeping, response framing. No socket, no model, one thread: CPU
time is what is measured, so it is far less sensitive to a busy machine than throughput.

Compares two checkouts' `server/` (each run in its own interpreter), alternating, repeated
(`git archive COMMIT server | tar -x -C DIR` makes one):

    .venv/bin/python bench/h2_parse_cost.py --before-src DIR [--after-src DIR] --rounds 7

Prints per-round microseconds per call and the medians, and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# Run in a child interpreter whose PYTHONPATH picks the checkout under test.
CHILD = r"""
import asyncio, json, sys, time
import hpack
sys.path.insert(0, sys.argv[2])
from null_transport import NullTransport
from pipeserve.api.h2 import frames as f
from pipeserve.api.h2.connection import Connection

CALLS, BATCH, BODY = int(sys.argv[1]), 64, 200

RESPONSE = b"\0" + (BODY).to_bytes(4, "big") + bytes(BODY)

class Answer:
    def __init__(self, stream): self.stream = stream
    def data(self, payload, end):
        if end: self.stream.send(RESPONSE, f.TRAILERS_OK)
    def reset(self): pass

class Endpoint:
    def open_call(self, stream, headers): return Answer(stream)
    def connection_closed(self, connection): pass

def stream_bytes(calls):
    encoder = hpack.Encoder()
    headers = [(":method", "POST"), (":scheme", "http"),
               (":path", "/inference.GRPCInferenceService/ModelInfer"),
               (":authority", "127.0.0.1:8001"), ("te", "trailers"),
               ("content-type", "application/grpc"), ("user-agent", "grpc-c++/1.57.0"),
               ("grpc-accept-encoding", "identity, deflate, gzip")]
    body = b"\0" + (BODY).to_bytes(4, "big") + bytes(BODY)
    first = (f.PREFACE + f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW})
             + f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW))
    batches, batch = [first], []
    for i in range(calls):
        sid = 1 + 2 * i
        block = encoder.encode(headers)
        batch.append(f.frame(f.HEADERS, f.END_HEADERS, sid, block)
                     + f.frame(f.DATA, f.END_STREAM, sid, body))
        if len(batch) == BATCH:
            batches.append(b"".join(batch)); batch = []
    if batch: batches.append(b"".join(batch))
    return batches

async def main():
    batches = stream_bytes(CALLS)
    conn = Connection(Endpoint())
    conn.connection_made(NullTransport())
    conn.data_received(batches[0])
    await asyncio.sleep(0)
    start = time.process_time()
    for data in batches[1:]:
        conn.data_received(data)
        await asyncio.sleep(0)  # the coalesced writes go out
    spent = time.process_time() - start
    assert not conn.streams, "every call must have been answered"
    print(json.dumps({"us_per_call": spent / CALLS * 1e6}))

asyncio.run(main())
"""


def measure(src: Path, calls: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(src / "server"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(calls), str(HERE / "bench")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return float(json.loads(done.stdout)["us_per_call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-src", type=Path, required=True, help="checkout with server/")
    parser.add_argument(
        "--after-src", type=Path, default=HERE, help="checkout with server/ (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    sources = {"before": args.before_src.resolve(), "after": args.after_src.resolve()}
    seen: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            us = measure(sources[name], args.calls)
            seen[name].append(us)
            print(f"r{r} {name:<6} {us:6.2f} us/call", flush=True)
    before, after = statistics.median(seen["before"]), statistics.median(seen["after"])
    print(f"median: before {before:.2f} us/call, after {after:.2f} us/call, "
          f"after/before {after / before:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
