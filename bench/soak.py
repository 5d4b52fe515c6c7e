"""Soak: the real pipeserve server with well-behaved and hostile gRPC clients at once, for minutes,
on loopback only. Good clients (tritonclient.grpc.aio, grpc C-core) call ModelInfer on an add-one
model and check every answer; hostile clients loop over the attacks the own transport bounds
(rapid reset, PING/SETTINGS/CONTINUATION floods, HPACK storm, oversized headers, gzip bomb,
answers held by a zero window, a client that never reads, silent connections). Reports the good
calls (OK / failed), what each attack got back (GOAWAY code, resets, closed), and the server's RSS
and open file descriptors before, at their peak, and after a settling pause.

    .venv/bin/python bench/soak.py --seconds 120

Bounded by construction: one connection per hostile client at a time, a fixed number of
clients, each attack a fixed size; the server's limits are its defaults except a 2 s preface
timeout (so the silent connections' fate is seen within the run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
import zlib
from contextlib import suppress
from pathlib import Path

import hpack
import numpy as np
import tritonclient.grpc.aio as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import serve_command, started  # noqa: E402
from vs_triton import ADD_ONE_WIDTH, add_one, write_pipeserve_repository  # noqa: E402

from pipeserve.api.generated import grpc_service_pb2 as pb  # noqa: E402
from pipeserve.api.h2 import frames as f  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 7: "REFUSED_STREAM", 9: "COMPRESSION_ERROR",
         11: "ENHANCE_YOUR_CALM"}  # fmt: skip


def server_memory(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of the server process."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def infer_request(x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="add_one")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((int(compressed),)) + len(payload).to_bytes(4, "big") + payload


class Raw:
    """One hostile HTTP/2 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()

    @classmethod
    async def open(cls, port: int, settings: dict[int, int] | None = None) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f.PREFACE + f.settings(settings or {}))
        return cls(reader, writer)

    def headers(self, path: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        return self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path),
             (":authority", "soak"), ("content-type", "application/grpc"), ("te", "trailers"),
             *extra]
        )  # fmt: skip

    def frame(self, kind: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.writer.write(f.frame(kind, flags, sid, payload))

    async def ending(self, timeout: float) -> str:
        """Reads until the server closes (or `timeout`): what it said last."""
        goaway = None
        resets = 0
        end = time.monotonic() + timeout
        try:
            while (left := end - time.monotonic()) > 0:
                head = await asyncio.wait_for(self.reader.readexactly(9), left)
                payload = await asyncio.wait_for(
                    self.reader.readexactly(int.from_bytes(head[:3], "big")), left
                )
                if head[3] == f.GOAWAY:
                    goaway = CODES.get(int.from_bytes(payload[4:8], "big"), "other")
                elif head[3] == f.RST_STREAM:
                    resets += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except TimeoutError:
            return f"open after {timeout:g}s" + (f", GOAWAY {goaway}" if goaway else "")
        return f"GOAWAY {goaway}" if goaway else ("closed" if not resets else "reset, closed")

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


def _gzip_bomb(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    return first + again * (size // len(chunk) - 1)


BOMB = _gzip_bomb(1 << 30)  # 1 GiB of zeros, over the default --grpc-max-decompressed-bytes
REQUEST = infer_request(np.ones((1, ADD_ONE_WIDTH), np.float32))


async def rapid_reset(port: int) -> str:
    c = await Raw.open(port)
    block = c.headers(LIVE)
    out = bytearray()
    for i in range(2000):
        sid = 1 + 2 * i
        out += f.frame(f.HEADERS, f.END_HEADERS, sid, block)
        out += f.frame(f.DATA, f.END_STREAM, sid, grpc_message(b""))
        out += f.frame(f.RST_STREAM, 0, sid, f.CANCEL.to_bytes(4, "big"))
    c.writer.write(bytes(out))
    return await finish(c, 10)


async def ping_flood(port: int) -> str:
    c = await Raw.open(port)
    c.writer.write(f.frame(f.PING, 0, 0, b"soaksoak") * 3000)
    return await finish(c, 10)


async def settings_flood(port: int) -> str:
    c = await Raw.open(port)
    c.writer.write(f.settings({f.MAX_FRAME_SIZE: 16_384}) * 300)
    return await finish(c, 10)


async def continuation_flood(port: int) -> str:
    c = await Raw.open(port)
    c.frame(f.HEADERS, 0, 1, c.headers(LIVE)[:4])
    c.writer.write(f.frame(f.CONTINUATION, 0, 1) * 100)
    return await finish(c, 10)


async def hpack_storm(port: int) -> str:
    c = await Raw.open(port)
    c.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, b"\x20" * 15_000 + c.headers(LIVE))
    return await finish(c, 10)


async def big_headers(port: int) -> str:
    c = await Raw.open(port)
    block = c.headers(LIVE) + f.literal(b"x-big", b"v" * 40_000)
    c.frame(f.HEADERS, 0, 1, block[:15_000])
    c.frame(f.CONTINUATION, 0, 1, block[15_000:30_000])
    c.frame(f.CONTINUATION, f.END_HEADERS, 1, block[30_000:])
    return await finish(c, 10)


async def gzip_bomb(port: int) -> str:
    c = await Raw.open(port)
    c.frame(f.HEADERS, f.END_HEADERS, 1, c.headers(INFER, (("grpc-encoding", "gzip"),)))
    body = grpc_message(BOMB, compressed=True)
    step = 16_384
    for at in range(0, len(body), step):
        c.frame(f.DATA, f.END_STREAM if at + step >= len(body) else 0, 1, body[at : at + step])
    answer = await finish(c, 3)
    return answer.replace("open after 3s", "answered")  # an error status, the connection lives


async def zero_window(port: int) -> str:
    c = await Raw.open(port, {f.INITIAL_WINDOW_SIZE: 0})
    block = c.headers(INFER)
    for i in range(300):  # answers the server must hold; past its bound: REFUSED_STREAM
        c.frame(f.HEADERS, f.END_HEADERS, 1 + 2 * i, block)
        c.frame(f.DATA, f.END_STREAM, 1 + 2 * i, grpc_message(REQUEST))
    return await finish(c, 2)


async def non_reader(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c = Raw(reader, writer)
    writer.write(f.PREFACE + f.settings({f.INITIAL_WINDOW_SIZE: f.MAX_WINDOW}))
    c.frame(f.WINDOW_UPDATE, 0, 0, (f.MAX_WINDOW - f.DEFAULT_WINDOW).to_bytes(4, "big"))
    block = c.headers(INFER)
    for i in range(1000):
        c.frame(f.HEADERS, f.END_HEADERS, 1 + 2 * i, block)
        c.frame(f.DATA, f.END_STREAM, 1 + 2 * i, grpc_message(REQUEST))
    await asyncio.sleep(2)  # reads nothing
    await c.close()
    return "closed by the client"


async def silent(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        gone = await asyncio.wait_for(reader.read(), 15)
        return "closed by the server" if gone == b"" else "answered"
    except TimeoutError:
        return "open after 15s"
    finally:
        writer.close()


async def finish(c: Raw, timeout: float) -> str:
    try:
        return await c.ending(timeout)
    finally:
        await c.close()


ATTACKS = (rapid_reset, ping_flood, settings_flood, continuation_flood, hpack_storm,
           big_headers, gzip_bomb, zero_window, non_reader, silent)  # fmt: skip


async def good_client(port: int, stop: float, tally: collections.Counter[str]) -> None:
    async with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        x = np.arange(ADD_ONE_WIDTH, dtype=np.float32).reshape(1, -1)
        inputs = [grpcclient.InferInput("x", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        while time.monotonic() < stop:
            try:
                result = await client.infer("add_one", inputs, client_timeout=10)
                ok = np.array_equal(result.as_numpy("y"), x + 1)
                tally["ok" if ok else "wrong answer"] += 1
            except Exception as exc:  # counted, not fatal: the soak reports every failure
                tally[f"failed: {type(exc).__name__}: {str(exc)[:80]}"] += 1


async def hostile_client(
    port: int, stop: float, index: int, outcomes: dict[str, collections.Counter[str]]
) -> None:
    n = index
    while time.monotonic() < stop:
        attack = ATTACKS[n % len(ATTACKS)]
        n += 1
        try:
            outcome = await attack(port)
        except Exception as exc:
            outcome = f"client error {type(exc).__name__}"
        outcomes[attack.__name__][outcome] += 1


async def soak(port: int, pid: int, seconds: float, good: int, hostile: int) -> None:
    warm: collections.Counter[str] = collections.Counter()
    await good_client(port, time.monotonic() + 3, warm)  # warm-up: first allocations done
    before = server_memory(pid)
    stop = time.monotonic() + seconds
    tally: collections.Counter[str] = collections.Counter()
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    peak = list(before)

    async def watch() -> None:
        while time.monotonic() < stop:
            rss, fds = server_memory(pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], fds)
            await asyncio.sleep(0.5)

    await asyncio.gather(
        watch(),
        *(good_client(port, stop, tally) for _ in range(good)),
        *(hostile_client(port, stop, i, outcomes) for i in range(hostile)),
    )
    await asyncio.sleep(5)  # lingering closes finish
    after_tally: collections.Counter[str] = collections.Counter()
    await good_client(port, time.monotonic() + 2, after_tally)
    after = server_memory(pid)
    mib = 1 << 20
    print(f"\nsoak: {seconds:g}s, {good} good clients, {hostile} hostile clients")
    print(f"good calls during: {dict(tally)}")
    print(f"good calls after:  {dict(after_tally)}")
    print("| attack | runs | server's answer |")
    print("|---|---:|---|")
    for name, counter in sorted(outcomes.items()):
        answers = ", ".join(f"{k} x{v}" for k, v in counter.most_common())
        print(f"| {name} | {sum(counter.values())} | {answers} |")
    print("| server | before | peak | after |")
    print("|---|---:|---:|---:|")
    print(f"| RSS MiB | {before[0] / mib:.1f} | {peak[0] / mib:.1f} | {after[0] / mib:.1f} |")
    print(f"| open fds | {before[1]} | {peak[1]} | {after[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--good", type=int, default=4, help="well-behaved clients")
    parser.add_argument("--hostile", type=int, default=6, help="hostile clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {"add_one": add_one(root / "a.onnx")})
        cmd = [*serve_command(repo), "--grpc-preface-timeout-secs", "2"]
        with started(cmd, "pipeserve ready", r"grpc=\S+:(\d+)") as (port, pid):
            asyncio.run(soak(port, pid, args.seconds, args.good, args.hostile))


if __name__ == "__main__":
    main()
