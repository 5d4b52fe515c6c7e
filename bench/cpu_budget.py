"""Where the machine's CPU goes per request, server and load generator together, and the rate
that budget allows any server on this machine (issue 15: what a target above it would need).

One pipeserve serving one of bench/vs_triton.py's models (its config: `max_batch_size 32`,
delay 0, one CPU instance, default threads) under perf_analyzer in sync mode: the CPU seconds
of each server thread (/proc/<pid>/task/*/stat) and of perf_analyzer (this process's children)
over the run, per request answered. `cores * 1e6 / total` is the rate at which the two together
would keep every core busy: no server whose model costs what this one's does can pass it here.

    .venv/bin/python bench/cpu_budget.py --model convnet --concurrency 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import serve_command, started  # noqa: E402
from loadgen import run_perf_analyzer  # noqa: E402
from loop_share import thread_cpu  # noqa: E402
from vs_triton import BUILDERS, MODELS, answered, write_pipeserve_repository  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_round(url: str, pid: int, model: str, concurrency: int, window: float) -> dict[str, float]:
    shape = f"x:{','.join(str(d) for d in MODELS[model][0])}"
    server0, load0, n0 = thread_cpu(pid), children_cpu(), answered(url, model)
    load = run_perf_analyzer(url, model, concurrency, window, shape, mode="sync")
    server1, load1, n1 = thread_cpu(pid), children_cpu(), answered(url, model)
    requests = n1 - n0
    out = {"infer/s": load.throughput, "perf_analyzer": (load1 - load0) / requests * 1e6}
    for name, seconds in server1.items():
        out[f"server: {name}"] = (seconds - server0.get(name, 0.0)) / requests * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="convnet")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {args.model: BUILDERS[args.model](root / f"{args.model}.onnx")}
        repo = write_pipeserve_repository(root / "repo", files)
        with started(serve_command(repo), "pipeserve ready", r"grpc=\S+:(\d+)") as (port, pid):
            rounds = [
                one_round(f"127.0.0.1:{port}", pid, args.model, args.concurrency, args.window)
                for _ in range(args.rounds)
            ]
    keys = [k for k in rounds[0] if k != "infer/s"]
    med = {k: statistics.median(r.get(k, 0.0) for r in rounds) for k in [*keys, "infer/s"]}
    total = sum(med[k] for k in keys)
    print(f"\n{args.model}, concurrency {args.concurrency}, sync; medians of {args.rounds} rounds")
    print("| CPU per request | us |\n|---|---:|")
    for k in sorted(keys, key=lambda k: -med[k]):
        if med[k] >= 0.5:
            print(f"| {k} | {med[k]:,.0f} |")
    print(f"| total | {total:,.0f} |")
    print(f"\nserved: {med['infer/s']:,.0f} infer/s; every core busy at this cost: "
          f"{cores} x 1e6 / {total:,.0f} = {cores * 1e6 / total:,.0f} infer/s")  # fmt: skip


if __name__ == "__main__":
    main()
