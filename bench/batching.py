"""Dynamic batching benchmark: an MLP (512 -> 2048 -> 2048 -> 512, FP32) served by pipeserve with
batching off, on (delay 0), with fixed delays and in adaptive mode, at concurrency 1, 8 and 32,
next to two limits measured in the same run:

- onnxruntime in-process at the batch sizes the server formed (ModelStatistics batch_stats of
  that very measurement, each size timed in this process with the server's session options, or
  with `--limit-threads N` intra-op threads: 0 is onnxruntime's own default, all cores);
- do-nothing servers (bench/noop_server.py) that only decode requests and answer, one on
  grpc.aio and one on pipeserve's own HTTP/2 transport (api/h2): the ceiling of per-request gRPC
  work in Python on this machine. The faster of the two is the gRPC limit.

One more row serves the delay-0 variant through grpc.aio (`--grpc-frontend grpcio`), so the
transport's share of the result is visible in the same run.

Load: perf_analyzer (closed loop, --async unless `--mode sync`, batch 1 per request) where it
runs, else the async tritonclient generator in bench/loadgen.py. Targets are measured in a
rotating order within each repeat, so drift on a shared machine hits them alike; the table gives
medians over repeats.

    .venv/bin/python bench/batching.py --repeats 2 --window 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_reference  # noqa: E402
from loadgen import Load, perf_analyzer_usable, run_aio, run_perf_analyzer  # noqa: E402

from pipeserve.runtime.devices import available_cpus  # noqa: E402
from pipeserve.runtime.instances import plan_instances  # noqa: E402

SIZES = (512, 2048, 2048, 512)
MAX_BATCH = 32
IO = (
    'input [{ name: "x" data_type: TYPE_FP32 dims: [512] }]\n'
    'output [{ name: "y" data_type: TYPE_FP32 dims: [512] }]\n'
)
# Served variants of the same model file: name -> config body after max_batch_size.
VARIANTS = {
    "off": "",
    "on": "dynamic_batching { }",
    "delay_500us": "dynamic_batching { max_queue_delay_microseconds: 500 }",
    "delay_2ms": "dynamic_batching { max_queue_delay_microseconds: 2000 }",
    "adaptive": 'dynamic_batching { }\nparameters { key: "batching_mode" value: '
    '{ string_value: "adaptive" } }',
}
NOOP = "noop"
NOOP_H2 = "noop_asyncio"
NOOPS = (NOOP, NOOP_H2)
ON_GRPCIO = "on_grpcio"  # mlp_on served with --grpc-frontend grpcio
TRITON = "triton"  # --triton: Triton's server, Python backend calling onnxruntime


def mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:], strict=False)):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((a, b)) * (1 / np.sqrt(a))).astype(np.float32), f"w{i}"
            )
        )
        inits.append(numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"h{i}"]))
        current = f"h{i}"
        if i < len(SIZES) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def write_repository(root: Path, model: Path, threads: int, instances: int) -> None:
    extra = ""
    if threads:
        extra += (
            'parameters { key: "intra_op_thread_count" value: '
            f'{{ string_value: "{threads}" }} }}\n'
        )
    if instances:
        extra += f"instance_group [{{ kind: KIND_CPU count: {instances} }}]\n"
    for variant, body in VARIANTS.items():
        folder = root / f"mlp_{variant}"
        (folder / "1").mkdir(parents=True)
        os.link(model, folder / "1" / "model.onnx")  # one file on disk for every variant
        (folder / "config.pbtxt").write_text(
            f'name: "mlp_{variant}"\nmax_batch_size: {MAX_BATCH}\n{IO}{body}\n{extra}'
        )


def serve_command(repository: Path) -> list[str]:
    """`pipeserve serve` on a free local port, metrics and HTTP off."""
    return [
        sys.executable, "-m", "pipeserve", "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--no-metrics", "--no-http",
    ]  # fmt: skip


@contextmanager
def process(
    cmd: list[str], ready: str, port_pattern: str, env: dict[str, str] | None = None
) -> Iterator[int]:
    """Start a server, yield its port once `ready` was logged, stop it afterwards."""
    with started(cmd, ready, port_pattern, env) as (port, _):
        yield port


@contextmanager
def started(
    cmd: list[str], ready: str, port_pattern: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, int]]:
    """As `process`, yielding (port, pid)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    port, lines = 0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(port_pattern, line):
            port = int(m.group(1))
        if ready in line:
            break
    if not port or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True)  # type: ignore[union-attr]
    drain.start()
    try:
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_port() -> int:
    """Triton cannot be told port 0: take a free one (a benchmark tolerates the tiny race)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def formed_batches(client: grpcclient.InferenceServerClient, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model).model_stats[0]
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    out = {size: n - before.get(size, 0) for size, n in after.items()}
    return {size: n for size, n in out.items() if n > 0}


class OrtTimer:
    """onnxruntime in process with the server's session options (one session, as one instance).

    Timed right after each server measurement, at the batch sizes that measurement formed, so
    the limit and the server see the same neighbours on a shared machine."""

    def __init__(self, model: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def seconds_per_batch(
        self, sizes: set[int], rounds: int = 4, runs: int = 6
    ) -> dict[int, float]:
        """Median seconds per run at each size; sizes interleaved round by round."""
        inputs = {
            size: np.random.default_rng(size).standard_normal((size, SIZES[0])).astype(np.float32)
            for size in sorted(sizes)
        }
        # The session sat idle while the server was measured: wake its threads and caches.
        until = time.monotonic() + 0.1
        while time.monotonic() < until:
            self.session.run(["y"], {"x": inputs[max(inputs)]})
        samples: dict[int, list[float]] = {size: [] for size in inputs}
        for _ in range(rounds):
            for size, x in inputs.items():
                self.session.run(["y"], {"x": x})  # warm: the first run of a shape allocates
                t0 = time.perf_counter()
                for _ in range(runs):
                    self.session.run(["y"], {"x": x})
                samples[size].append((time.perf_counter() - t0) / runs)
        return {size: statistics.median(times) for size, times in samples.items()}

    def limit(self, formed: dict[int, int]) -> float:
        """Inferences per second onnxruntime reaches in process running the same batches."""
        formed = formed or {1: 1}
        per_batch = self.seconds_per_batch(set(formed))
        rows = sum(size * n for size, n in formed.items())
        return rows / sum(per_batch[size] * n for size, n in formed.items())


def measure(
    url: str, model: str, concurrency: int, window: float, tool: str, mode: str = "async"
) -> Load:
    if tool == "perf_analyzer":
        return run_perf_analyzer(url, model, concurrency, window, f"x:{SIZES[0]}", mode=mode)
    x = np.random.default_rng(1).standard_normal((1, SIZES[0])).astype(np.float32)
    return run_aio(url, model, concurrency, window, {"x": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per window")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--loadgen", choices=["auto", "perf_analyzer", "aio"], default="auto")
    parser.add_argument(
        "--mode",
        choices=["async", "sync"],
        default="async",
        help="perf_analyzer's mode (sync: its default, one thread per request in flight)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/out/batching.json"))
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="per instance (0: server default)"
    )
    parser.add_argument(
        "--instances", type=int, default=0, help="instance_group count (0: config default)"
    )
    parser.add_argument(
        "--limit-threads",
        type=int,
        help="intra-op threads of the in-process onnxruntime limit (default: the server's; "
        "0: onnxruntime's default)",
    )
    parser.add_argument(
        "--triton",
        type=Path,
        help="a tritonserver folder (bin/, backends/, python_backend_stubs/: PyTriton's) to "
        "measure Triton in the same run (see bench/triton_reference.py)",
    )
    args = parser.parse_args()
    tool = args.loadgen
    if tool == "auto":
        tool = "perf_analyzer" if perf_analyzer_usable() else "aio"
    print(f"load generator: {tool}; cores available: {available_cpus()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = mlp(root / "mlp.onnx")
        write_repository(root / "repo", model, args.intra_op_threads, args.instances)
        serve = serve_command(root / "repo")
        noop = [sys.executable, str(Path(__file__).with_name("noop_server.py")), "--model", "mlp"]
        with (
            process(serve, "pipeserve ready", r"grpc=\S+:(\d+)") as port,
            process(
                [*serve, "--grpc-frontend", "grpcio"], "pipeserve ready", r"grpc=\S+:(\d+)"
            ) as grpcio_port,
            process(noop, "noop listening", r"noop listening: (\d+)") as noop_port,
            process(
                [*noop, "--frontend", "asyncio"], "noop listening", r"noop listening: (\d+)"
            ) as noop_h2_port,
            ExitStack() as optional,
        ):
            url = f"127.0.0.1:{port}"
            urls = {
                NOOP: f"127.0.0.1:{noop_port}",
                NOOP_H2: f"127.0.0.1:{noop_h2_port}",
                ON_GRPCIO: f"127.0.0.1:{grpcio_port}",
            }
            # The server's own default when not given (runtime/instances.py decides it).
            default = plan_instances([("CPU", max(1, args.instances), [])], {}).intra_op_threads
            threads = args.intra_op_threads or default
            targets = [*NOOPS, *VARIANTS, ON_GRPCIO]
            if args.triton is not None:
                home = args.triton
                triton_port = optional.enter_context(
                    process(
                        triton_reference.command(
                            home,
                            triton_reference.write_repository(
                                root / "triton", model, MAX_BATCH, IO
                            ),
                            triton_reference.backends(home, root / "triton_backends"),
                            _free_port(),
                        ),
                        "Started GRPCInferenceService",
                        r"GRPCInferenceService at \S+:(\d+)",
                        triton_reference.environment(threads),
                    )
                )
                urls[TRITON] = f"127.0.0.1:{triton_port}"
                targets.append(TRITON)
            limit_threads = threads if args.limit_threads is None else args.limit_threads
            print(f"in-process limit: intra_op_num_threads={limit_threads} (0: onnxruntime's)")
            timer = OrtTimer(model, limit_threads)
            clients = {
                u: grpcclient.InferenceServerClient(u)
                for u in (url, urls[ON_GRPCIO], urls.get(TRITON))
                if u is not None
            }
            rows: list[dict] = []
            for repeat in range(args.repeats):
                for c in args.concurrency:
                    shift = (repeat + args.concurrency.index(c)) % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        noop = target in NOOPS
                        name = (
                            "mlp"
                            if noop or target == TRITON
                            else f"mlp_{'on' if target == ON_GRPCIO else target}"
                        )
                        target_url = urls.get(target, url)
                        client = clients.get(target_url)
                        before = {} if client is None else formed_batches(client, name)
                        load = measure(target_url, name, c, args.window, tool, args.mode)
                        formed = (
                            {} if client is None else delta(formed_batches(client, name), before)
                        )
                        ort_limit = 0.0 if noop else timer.limit(formed)
                        rows.append(
                            dict(
                                repeat=repeat,
                                concurrency=c,
                                target=target,
                                throughput=load.throughput,
                                p50_us=load.p50_us,
                                p99_us=load.p99_us,
                                formed=formed,
                                ort_limit=ort_limit,
                            )
                        )
                        print(
                            f"r{repeat} c={c:<3} {target:<12} {load.throughput:9.1f}/s "
                            f"p50 {load.p50_us / 1000:7.2f} ms p99 {load.p99_us / 1000:7.2f} ms "
                            f"batches {_mean_batch(formed):5.2f} ORT {ort_limit:7.0f}/s",
                            flush=True,
                        )
            for client in clients.values():
                client.close()
            per_batch = timer.seconds_per_batch({1, 8, 32}, rounds=7, runs=8)
    report = summarise(rows, args.concurrency)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"tool": tool, "rows": rows, "ort_seconds_per_batch": per_batch, "report": report},
            indent=1,
            default=str,
        )
    )
    print(render(report, per_batch, tool, args))


def _mean_batch(formed: dict[int, int]) -> float:
    n = sum(formed.values())
    return sum(size * k for size, k in formed.items()) / n if n else 1.0


def summarise(rows: list[dict], concs: list[int]) -> list[dict]:
    """Medians over repeats; ratios are taken per repeat (against that repeat's do-nothing
    server and in-process timing) before the median."""
    noop = {
        (r["repeat"], r["concurrency"], r["target"]): r["throughput"]
        for r in rows
        if r["target"] in NOOPS
    }
    out = []
    for c in concs:
        for target in [*NOOPS, *VARIANTS, ON_GRPCIO, TRITON]:
            mine = [r for r in rows if r["concurrency"] == c and r["target"] == target]
            if not mine:
                continue
            throughput = statistics.median(r["throughput"] for r in mine)
            merged: dict[int, int] = {}
            for r in mine:
                for size, n in r["formed"].items():
                    merged[int(size)] = merged.get(int(size), 0) + n
            entry = dict(
                concurrency=c,
                target=target,
                throughput=throughput,
                p50_ms=statistics.median(r["p50_us"] for r in mine) / 1000,
                p99_ms=statistics.median(r["p99_us"] for r in mine) / 1000,
                mean_batch=_mean_batch(merged),
            )
            if target not in NOOPS:

                def grpc_limit(r: dict) -> float:  # the faster do-nothing server of that repeat
                    return max(noop[r["repeat"], r["concurrency"], n] for n in NOOPS)

                entry["ort_limit"] = statistics.median(r["ort_limit"] for r in mine)
                entry["vs_lower_limit"] = statistics.median(
                    r["throughput"] / min(r["ort_limit"], grpc_limit(r)) for r in mine
                )
                # The issue's own definition: against the do-nothing grpc.aio server.
                entry["vs_grpcio_limit"] = statistics.median(
                    r["throughput"] / min(r["ort_limit"], noop[r["repeat"], c, NOOP]) for r in mine
                )
                # If the gRPC work and the model's work could not overlap at all (one CPU budget
                # paying both in turn): context for a machine with fewer cores than both need.
                entry["serial_bound"] = statistics.median(
                    1 / (1 / r["ort_limit"] + 1 / grpc_limit(r)) for r in mine
                )
            out.append(entry)
    return out


def render(
    report: list[dict], per_batch: dict[int, float], tool: str, args: argparse.Namespace
) -> str:
    lines = [
        f"load generator: {tool}, {args.repeats} repeats x {args.window:g} s windows, medians",
        "",
        "| conc | server | infer/s | p50 ms | p99 ms | mean batch | ORT in-process at those "
        "batches (infer/s) | / lower limit | / lower limit (grpc.aio do-nothing) | "
        "serial bound (infer/s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        NOOP: "do-nothing, grpc.aio",
        NOOP_H2: "do-nothing, pipeserve transport",
        ON_GRPCIO: "pipeserve on, grpc.aio front end",
        TRITON: "Triton, Python backend + onnxruntime, delay 0",
    }
    for e in report:
        limit = f"{e['ort_limit']:.0f}" if "ort_limit" in e else ""
        ratio = f"{e['vs_lower_limit']:.2f}" if "vs_lower_limit" in e else ""
        ratio_aio = f"{e['vs_grpcio_limit']:.2f}" if "vs_grpcio_limit" in e else ""
        serial = f"{e['serial_bound']:.0f}" if "serial_bound" in e else ""
        server = names.get(e["target"], f"pipeserve {e['target']}")
        lines.append(
            f"| {e['concurrency']} | {server} | {e['throughput']:.0f} | {e['p50_ms']:.2f} | "
            f"{e['p99_ms']:.2f} | {e['mean_batch']:.1f} | {limit} | {ratio} | {ratio_aio} | "
            f"{serial} |"
        )
    lines += ["", "onnxruntime in-process, one session, batch b: infer/s = b / time per run"]
    for size in (1, 8, 32):
        lines.append(
            f"  batch {size:>2}: {size / per_batch[size]:8.0f} infer/s "
            f"({per_batch[size] * 1000:.2f} ms per run)"
        )
    by = {(e["concurrency"], e["target"]): e for e in report}
    top = max(args.concurrency)
    low = min(args.concurrency)
    if (top, "on") in by and (top, "off") in by:
        lines.append(
            f"\nbatching on / off at concurrency {top}: "
            f"{by[top, 'on']['throughput'] / by[top, 'off']['throughput']:.2f}x"
        )
        lines.append(
            f"delay 0, own transport / grpc.aio front end at concurrency {top}: "
            f"{by[top, 'on']['throughput'] / by[top, ON_GRPCIO]['throughput']:.2f}x"
        )
        if (top, TRITON) in by:
            lines.append(
                f"pipeserve delay 0 / Triton at concurrency {top}: "
                f"{by[top, 'on']['throughput'] / by[top, TRITON]['throughput']:.2f}x"
            )
        best_fixed = max(by[top, t]["throughput"] for t in VARIANTS if t not in ("off", "adaptive"))
        lines.append(
            f"adaptive / best fixed delay throughput at concurrency {top}: "
            f"{by[top, 'adaptive']['throughput'] / best_fixed:.2f}x"
        )
    if (low, "adaptive") in by:
        lines.append(
            f"adaptive / delay 0 p50 at concurrency {low}: "
            f"{by[low, 'adaptive']['p50_ms'] / by[low, 'on']['p50_ms']:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
