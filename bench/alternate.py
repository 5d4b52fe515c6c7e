"""Close comparisons of batching settings on ONE server: perf_analyzer runs alternate between the
variants of bench/batching.py round after round, so drift on a shared machine hits them alike,
and each run also reports how much slower onnxruntime computed those same batches inside the
server than in this (otherwise idle) process.

    .venv/bin/python bench/alternate.py --concurrency 32 --variants on adaptive delay_500us

Prints one line per run and the medians per variant. "compute in server / quiet" is the
server's compute_infer time (ModelStatistics) over the in-process time of the same batches;
"slot busy" is the server's compute time over the run's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import (  # noqa: E402
    VARIANTS,
    OrtTimer,
    mlp,
    process,
    serve_command,
    write_repository,
)
from loadgen import run_perf_analyzer  # noqa: E402

from pipeserve.runtime.instances import plan_instances  # noqa: E402


def compute(client: grpcclient.InferenceServerClient, model: str) -> dict[int, tuple[int, int]]:
    stats = client.get_inference_statistics(model).model_stats[0]
    return {b.batch_size: (b.compute_infer.count, b.compute_infer.ns) for b in stats.batch_stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["on", "adaptive"], choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = mlp(root / "mlp.onnx")
        write_repository(root / "repo", model, 0, 0)
        serve = serve_command(root / "repo")
        threads = plan_instances([("CPU", 1, [])], {}).intra_op_threads
        timer = OrtTimer(model, threads)
        results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in args.variants}
        with process(serve, "pipeserve ready", r"grpc=\S+:(\d+)") as port:
            url = f"127.0.0.1:{port}"
            client = grpcclient.InferenceServerClient(url)
            for r in range(args.rounds):
                for variant in args.variants:
                    name = f"mlp_{variant}"
                    before = compute(client, name)
                    load = run_perf_analyzer(url, name, args.concurrency, args.window, "x:512")
                    after = compute(client, name)
                    batches = {
                        size: (n - before.get(size, (0, 0))[0], ns - before.get(size, (0, 0))[1])
                        for size, (n, ns) in after.items()
                    }
                    batches = {size: v for size, v in batches.items() if v[0] > 0}
                    quiet = timer.seconds_per_batch(set(batches))
                    server_s = sum(ns for _, ns in batches.values()) / 1e9
                    quiet_s = sum(quiet[size] * n for size, (n, _) in batches.items())
                    rows = sum(size * n for size, (n, _) in batches.items())
                    slowdown = server_s / quiet_s
                    busy = server_s / (rows / load.throughput)
                    results[variant].append((load.throughput, load.p50_us / 1000, slowdown, busy))
                    print(
                        f"round {r} {variant:<12} {load.throughput:8.0f} infer/s "
                        f"p50 {load.p50_us / 1000:6.2f} ms  compute in server / quiet "
                        f"{slowdown:4.2f}  slot busy {busy:4.2f}",
                        flush=True,
                    )
            client.close()
    print(f"\nmedians over {args.rounds} rounds, concurrency {args.concurrency}:")
    for variant, runs in results.items():
        t, p, s, b = (statistics.median(x[i] for x in runs) for i in range(4))
        print(
            f"  {variant:<12} {t:8.0f} infer/s  p50 {p:6.2f} ms  compute in server / quiet "
            f"{s:4.2f}  slot busy {b:4.2f}"
        )


if __name__ == "__main__":
    main()
