"""What recording metrics costs: per request in process, and as server throughput on vs off.

Part 1 (in process): the observer calls the scheduler makes for one request (pending +1,
execution_done, requests_succeeded, pending -1), timed for
  - ModelStats alone (the server with --no-metrics),
  - FanOut(ModelStats, ModelMetrics) (the server with metrics),
  - FanOut(ModelStats, prometheus_client children) recording the same series the usual way
    (pre-bound Counter/Gauge/Histogram children), to show why ModelMetrics keeps plain ints.
Part 2 (real servers): two `pipeserve serve` processes over the same repository, one with
--no-metrics, both up at once, each driven by its own client process with the same closed-loop
load (tritonclient.grpc.aio, C requests in flight, a tiny model so that per-request overhead
weighs the most), in simultaneous bursts, so that a shared machine's neighbours hit both alike.
Per burst and server: throughput, and the server process's CPU time per request (from /proc).
Prometheus is imitated by a scrape of /metrics every --scrape-interval seconds throughout.
`--control` runs the same with metrics off on both servers: the spread of that A/A ratio is
the method's noise floor.

    .venv/bin/python bench/metrics_overhead.py --bursts 16 --seconds 3 --concurrency 8
    .venv/bin/python bench/metrics_overhead.py --bursts 16 --seconds 3 --concurrency 8 --control
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeserve.metrics.http import render_metrics
from pipeserve.metrics.recorder import LATENCY_BOUNDS_NS, ServerMetrics
from pipeserve.observers import ExecutionTimings, FanOut
from pipeserve.statistics import ModelStats

# ---- part 1 -------------------------------------------------------------------------------


class PrometheusClientObserver:
    """The conventional way: prometheus_client children bound once, updated per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "version")
        buckets = [b / 1e9 for b in LATENCY_BOUNDS_NS]

        def counter(name: str) -> Counter:
            return Counter(name, name, labels, registry=registry)

        def hist(name: str) -> Histogram:
            return Histogram(name, name, labels, registry=registry, buckets=buckets)

        values = ("m", "1")
        self.success = counter("success").labels(*values)
        self.failure = counter("failure").labels(*values)
        self.count = counter("count").labels(*values)
        self.exec = counter("exec").labels(*values)
        self.request_us = counter("request_us").labels(*values)
        self.queue_us = counter("queue_us").labels(*values)
        self.input_us = counter("input_us").labels(*values)
        self.infer_us = counter("infer_us").labels(*values)
        self.output_us = counter("output_us").labels(*values)
        self.pending = Gauge("pending", "pending", labels, registry=registry).labels(*values)
        self.request_h = hist("request_h").labels(*values)
        self.queue_h = hist("queue_h").labels(*values)
        self.compute_h = hist("compute_h").labels(*values)
        self.batch_h = Histogram("batch_h", "b", labels, registry=registry).labels(*values)

    def requests_succeeded(
        self, execution: ExecutionTimings, requests: list[tuple[int, int, int]]
    ) -> None:
        for batch_size, total_ns, queue_ns in requests:
            self.success.inc()
            self.count.inc(batch_size)
            self.request_us.inc(total_ns / 1e3)
            self.queue_us.inc(queue_ns / 1e3)
            self.input_us.inc(execution.compute_input_ns / 1e3)
            self.infer_us.inc(execution.compute_infer_ns / 1e3)
            self.output_us.inc(execution.compute_output_ns / 1e3)
            self.request_h.observe(total_ns / 1e9)
            self.queue_h.observe(queue_ns / 1e9)

    def request_failed(self, reason: str, total_ns: int) -> None:
        self.failure.inc()

    def execution_done(self, execution: ExecutionTimings) -> None:
        self.exec.inc()
        total = (
            execution.compute_input_ns + execution.compute_infer_ns + execution.compute_output_ns
        )
        self.compute_h.observe(total / 1e9)
        self.batch_h.observe(execution.batch_size)

    def pending_changed(self, delta: int) -> None:
        self.pending.inc(delta)


def per_request_ns(observer: object, n: int) -> float:
    execution = ExecutionTimings(1, 20_000, 300_000, 15_000)
    pending = observer.pending_changed  # type: ignore[attr-defined]
    done = observer.execution_done  # type: ignore[attr-defined]
    succeeded = observer.requests_succeeded  # type: ignore[attr-defined]
    start = time.perf_counter_ns()
    for i in range(n):
        pending(1)
        done(execution)
        succeeded(execution, [(1, 400_000 + i, 30_000)])
        pending(-1)
    return (time.perf_counter_ns() - start) / n


def part1(n: int, repeats: int) -> dict[str, float]:
    def stats_only() -> object:
        return ModelStats()

    def with_metrics() -> object:
        metrics = ServerMetrics(CollectorRegistry(), process_metrics=False, detect_gpus=False)
        return FanOut([ModelStats(), metrics.bind_model("m", 1)])

    def with_client() -> object:
        return FanOut([ModelStats(), PrometheusClientObserver(CollectorRegistry())])

    results: dict[str, list[float]] = {"stats": [], "metrics": [], "prometheus_client": []}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        results["stats"].append(per_request_ns(stats_only(), n))
        results["metrics"].append(per_request_ns(with_metrics(), n))
        results["prometheus_client"].append(per_request_ns(with_client(), n))
    return {k: statistics.median(v) for k, v in results.items()}


def render_ms(models: int, repeats: int = 5) -> float:
    """Median time to render /metrics with `models` bound model versions (each recorded once)."""
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, detect_gpus=False)
    execution = ExecutionTimings(1, 20_000, 300_000, 15_000)
    for i in range(models):
        m = metrics.bind_model(f"model_{i}", 1)
        m.execution_done(execution)
        m.requests_succeeded(execution, [(1, 400_000, 30_000)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        render_metrics(registry)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


# ---- part 2 -------------------------------------------------------------------------------

_LISTENING = re.compile(r"pipeserve listening: grpc=(\S+):(\d+) metrics=(\S+)")


def write_repository(root: Path) -> None:
    dims: list[int | str] = ["batch", 16]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "add_sub",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("OUTPUT0", "OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    (root / "add_sub" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "add_sub" / "1" / "model.onnx"))


class Server:
    def __init__(self, repo: Path, metrics: bool) -> None:
        cmd = [sys.executable, "-m", "pipeserve", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--no-http"]  # fmt: skip
        if not metrics:
            cmd.append("--no-metrics")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.grpc = ""
        self.metrics_url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = _LISTENING.search(line)
                if m:
                    self.grpc = f"127.0.0.1:{m.group(2)}"
                    if m.group(3) != "off":
                        self.metrics_url = f"http://{m.group(3)}/metrics"
                if "pipeserve ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or self.proc.poll() is not None:
            raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    """A closed loop of `concurrency` requests in flight against one server, run in bursts."""

    def __init__(self, url: str, concurrency: int) -> None:
        import tritonclient.grpc.aio as aioclient

        self.client = aioclient.InferenceServerClient(url)
        self.inputs = []
        for name in ("INPUT0", "INPUT1"):
            i = aioclient.InferInput(name, [1, 16], "FP32")
            i.set_data_from_numpy(np.ones((1, 16), np.float32))
            self.inputs.append(i)
        self.concurrency = concurrency

    async def burst(self, seconds: float) -> tuple[int, float]:
        """Requests completed and elapsed seconds."""
        count = 0
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < stop_at:
                await self.client.infer("add_sub", self.inputs)
                count += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return count, time.monotonic() - start


def scraper(url: str, interval: float, stop: threading.Event, sizes: list[int]) -> None:
    while not stop.wait(interval):
        with urllib.request.urlopen(url, timeout=10) as response:
            sizes.append(len(response.read()))


def client_process(url: str, concurrency: int, conn: Connection) -> None:
    """A load generator in its own process (its own GIL), bursting on command."""

    async def serve() -> None:
        load = Load(url, concurrency)
        while (seconds := conn.recv()) is not None:
            conn.send(await load.burst(seconds))
        await load.client.close()

    asyncio.run(serve())


def measure(
    servers: dict[str, Server], bursts: int, seconds: float, concurrency: int
) -> dict[str, list[tuple[float, float]]]:
    """Burst both servers at the same time, each from its own client process, so that whatever
    else the machine is doing hits both alike. Per burst and server: (requests/s, server CPU
    microseconds per request)."""
    ctx = multiprocessing.get_context("spawn")
    pipes: dict[str, Connection] = {}
    clients = []
    for mode, server in servers.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=client_process, args=(server.grpc, concurrency, child))
        proc.start()
        pipes[mode] = parent
        clients.append(proc)
    try:
        for pipe in pipes.values():  # warm-up: sessions, connections, allocator
            pipe.send(2.0)
        for pipe in pipes.values():
            pipe.recv()
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in servers}
        for i in range(bursts):
            cpu0 = {mode: cpu_seconds(s.proc.pid) for mode, s in servers.items()}
            for pipe in pipes.values():
                pipe.send(seconds)
            for mode, pipe in pipes.items():
                n, elapsed = pipe.recv()
                cpu = cpu_seconds(servers[mode].proc.pid) - cpu0[mode]
                results[mode].append((n / elapsed, cpu / n * 1e6))
            a, b = (results[mode][-1] for mode in servers)
            names = list(servers)
            print(f"  burst {i + 1:2d}: {names[0]} {a[0]:7.1f} req/s {a[1]:6.0f} cpu-us/req | "
                  f"{names[1]} {b[0]:7.1f} req/s {b[1]:6.0f} cpu-us/req", flush=True)  # fmt: skip
    finally:
        for pipe in pipes.values():
            pipe.send(None)
        for proc in clients:
            proc.join(30)
    return results


def part2(
    bursts: int, seconds: float, concurrency: int, scrape_interval: float, control: bool
) -> dict:
    """`control`: both servers without metrics (an A/A run that shows the method's noise)."""
    scrape_bytes: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        write_repository(repo)
        servers = {"off": Server(repo, metrics=False), "on": Server(repo, metrics=not control)}
        stop = threading.Event()
        if not control:
            threading.Thread(
                target=scraper,
                args=(servers["on"].metrics_url, scrape_interval, stop, scrape_bytes),
                daemon=True,
            ).start()
        try:
            results = measure(servers, bursts, seconds, concurrency)
        finally:
            stop.set()
            for server in servers.values():
                server.stop()
    pairs = list(zip(results["off"], results["on"], strict=True))
    throughput = [on[0] / off[0] for off, on in pairs]
    cpu = [on[1] / off[1] for off, on in pairs]
    return {
        "throughput_ratio": statistics.median(throughput),
        "throughput_iqr": statistics.quantiles(throughput, n=4)[::2],
        "cpu_ratio": statistics.median(cpu),
        "cpu_iqr": statistics.quantiles(cpu, n=4)[::2],
        "median_off": statistics.median(r[0] for r in results["off"]),
        "median_on": statistics.median(r[0] for r in results["on"]),
        "cpu_off": statistics.median(r[1] for r in results["off"]),
        "cpu_on": statistics.median(r[1] for r in results["on"]),
        "scrapes": len(scrape_bytes),
        "scrape_bytes": statistics.median(scrape_bytes) if scrape_bytes else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per burst")
    parser.add_argument("--bursts", type=int, default=10, help="simultaneous bursts")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=200_000, help="part 1 requests per timing")
    parser.add_argument("--skip-server", action="store_true", help="part 1 only")
    parser.add_argument(
        "--control", action="store_true", help="A/A: both servers without metrics (noise floor)"
    )
    args = parser.parse_args()

    print("part 1: observer cost per request (median of 5 interleaved timings)")
    p1 = part1(args.calls, 5)
    for name, ns in p1.items():
        print(f"  {name:18s} {ns:8.0f} ns/request")
    print(f"  metrics add        {p1['metrics'] - p1['stats']:8.0f} ns/request over stats alone")
    print(f"  prometheus_client  {p1['prometheus_client'] - p1['stats']:8.0f} ns/request instead")
    for models in (1, 100):
        print(f"  scrape render, {models:3d} model(s): {render_ms(models):6.2f} ms")
    if args.skip_server:
        return
    print(
        f"part 2: servers with metrics off and {'off (control)' if args.control else 'on'}, "
        f"add_sub batch 1, concurrency {args.concurrency} each, {args.bursts} simultaneous "
        f"{args.seconds:.0f} s bursts"
    )
    p2 = part2(args.bursts, args.seconds, args.concurrency, args.scrape_interval, args.control)
    print(f"  median req/s: off {p2['median_off']:.1f}, on {p2['median_on']:.1f}")
    print(f"  median server cpu-us/request: off {p2['cpu_off']:.0f}, on {p2['cpu_on']:.0f}")
    lo, hi = p2["throughput_iqr"]
    print(
        f"  paired on/off throughput ratio: median {p2['throughput_ratio']:.3f}, "
        f"IQR {lo:.3f}-{hi:.3f}"
    )
    lo, hi = p2["cpu_iqr"]
    print(f"  paired on/off server-CPU-per-request ratio: median {p2['cpu_ratio']:.3f}, "
          f"IQR {lo:.3f}-{hi:.3f}")  # fmt: skip
    print(f"  {p2['scrapes']} scrapes of /metrics, ~{p2['scrape_bytes']:.0f} bytes each")


if __name__ == "__main__":
    main()
