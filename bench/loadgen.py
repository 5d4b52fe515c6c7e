"""Closed-loop load over the Triton gRPC protocol: perf_analyzer when it runs here, else an async
tritonclient generator. Both keep `concurrency` requests in flight (batch 1 each) for a measured
window after a warm-up, and report throughput and p50/p99 latency.

perf_analyzer ships in tritonclient's wheel (bin/perf_analyzer); it needs libb64 (Debian
`libb64-0d`) and libcudart.so.12 (pip `nvidia-cuda-runtime-cu12`), found here through
LD_LIBRARY_PATH even on machines without a GPU.
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Load:
    throughput: float  # inferences per second
    p50_us: float
    p99_us: float
    tool: str


def _perf_analyzer() -> tuple[str, dict[str, str]] | None:
    exe = Path(sys.executable).with_name("perf_analyzer")
    if not exe.exists():
        found = shutil.which("perf_analyzer")
        if found is None:
            return None
        exe = Path(found)
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]

        lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    except ImportError:
        pass
    probe = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env)
    if "error while loading shared libraries" in probe.stderr:
        return None
    return str(exe), env


def perf_analyzer_usable() -> bool:
    return _perf_analyzer() is not None


def run_perf_analyzer(
    url: str,
    model: str,
    concurrency: int,
    window_s: float,
    shape: str,
    *,
    mode: str = "async",
    streaming: bool = False,
    protocol: str = "grpc",
    extra: tuple[str, ...] = (),
) -> Load:
    """`mode`: "async" (perf_analyzer --async) or "sync" (its default: one thread per request
    in flight); `streaming`: ModelStreamInfer instead of unary calls; `protocol`: "grpc" or
    "http" (KServe v2 REST with binary tensors; `url` is then the HTTP endpoint); `extra`: more
    perf_analyzer arguments (e.g. its --ssl-grpc-* options)."""
    found = _perf_analyzer()
    if found is None:
        raise RuntimeError("perf_analyzer does not run here")
    exe, env = found
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        cmd = [
            exe,
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            *(["--async"] if mode == "async" else []),
            *(["--streaming"] if streaming else []),
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "-p",
            str(int(window_s * 1000)),
            # A shared 2-core machine rarely looks "stable" by perf_analyzer's 10% rule: accept
            # wide spreads (3 windows at least, 10 at most) and repeat whole runs instead.
            "-s",
            "1000",
            "--max-trials",
            "10",
            "--shape",
            shape,
            "-f",
            str(report),
            *extra,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"perf_analyzer failed:\n{done.stdout[-2000:]}\n{done.stderr}")
        row = next(csv.DictReader(report.open()))
    return Load(
        float(row["Inferences/Second"]),
        float(row["p50 latency"]),
        float(row["p99 latency"]),
        "perf_analyzer",
    )


def run_aio(
    url: str, model: str, concurrency: int, window_s: float, inputs: dict[str, np.ndarray]
) -> Load:
    """The fallback: asyncio tritonclient, `concurrency` callers on one channel."""
    return asyncio.run(_aio(url, model, concurrency, window_s, inputs))


async def _aio(
    url: str, model: str, concurrency: int, window_s: float, arrays: dict[str, np.ndarray]
) -> Load:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    tensors = []
    for name, array in arrays.items():
        t = aioclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    latencies: list[int] = []
    measuring = False
    stop = False

    async def caller() -> None:
        while not stop:
            t0 = time.monotonic_ns()
            await client.infer(model, tensors)
            if measuring:
                latencies.append(time.monotonic_ns() - t0)

    try:
        tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
        await asyncio.sleep(min(2.0, window_s))  # warm-up
        measuring = True
        start = time.monotonic()
        await asyncio.sleep(window_s * 3)
        measuring = False
        elapsed = time.monotonic() - start
        stop = True
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    us = sorted(x / 1000 for x in latencies)
    return Load(
        len(us) / elapsed,
        statistics.median(us),
        us[min(len(us) - 1, int(len(us) * 0.99))],
        "tritonclient.aio",
    )
