"""Where one pipeserve process spends its CPU per request, thread by thread, and what a second
process on SO_REUSEPORT-style sharding would add (issue 15: "beyond one core").

One server (add-one model, the vs_triton.py config) under perf_analyzer at concurrency 32: the
CPU seconds of each of its threads over the measured run (from /proc/<pid>/task/*/stat) divided
by the requests it answered, and the event loop thread's utilisation (its CPU seconds over wall
seconds). The loop is the one thread every request passes through, so 1e6 / (loop us per
request) is the ceiling of one process however many cores the host has.

Then the same total load split over two independent processes (two ports, two perf_analyzers
at concurrency 16 each, at once) against one process at 32: on a host with cores to spare the
sum should approach twice one process; on this 2-core machine it shows what the cores allow.

    .venv/bin/python bench/loop_share.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import serve_command, started  # noqa: E402
from loadgen import Load, run_perf_analyzer  # noqa: E402
from vs_triton import add_one, answered, write_pipeserve_repository  # noqa: E402

SHAPE = "x:16"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if int(task.name) == pid:
            name = "event loop (main thread)"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def one_process(port: int, pid: int, window: float) -> dict[str, float]:
    url = f"127.0.0.1:{port}"
    cpu0, n0, t0 = thread_cpu(pid), answered(url, "add_one"), time.monotonic()
    load = run_perf_analyzer(url, "add_one", 32, window, SHAPE, mode="sync")
    cpu1, n1, t1 = thread_cpu(pid), answered(url, "add_one"), time.monotonic()
    requests = n1 - n0
    result = {"throughput": load.throughput, "wall_s": t1 - t0, "requests": requests}
    for name, seconds in cpu1.items():
        result[f"us/req {name}"] = (seconds - cpu0.get(name, 0.0)) / requests * 1e6
    loop = cpu1["event loop (main thread)"] - cpu0["event loop (main thread)"]
    result["loop busy"] = loop / (t1 - t0)
    return result


def two_processes(ports: list[int], window: float) -> float:
    loads: list[Load] = []

    def drive(port: int) -> None:
        loads.append(run_perf_analyzer(f"127.0.0.1:{port}", "add_one", 16, window, SHAPE))

    threads = [threading.Thread(target=drive, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(load.throughput for load in loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {"add_one": add_one(root / "a.onnx")})
        servers = [
            stack.enter_context(started(serve_command(repo), "pipeserve ready", r"grpc=\S+:(\d+)"))
            for _ in range(2)
        ]
        singles: list[dict[str, float]] = []
        pairs: list[float] = []
        for r in range(args.rounds):
            singles.append(one_process(*servers[0], args.window))
            pairs.append(two_processes([port for port, _ in servers], args.window))
            print(f"round {r}: one process {singles[-1]['throughput']:.0f}/s, "
                  f"two processes {pairs[-1]:.0f}/s", flush=True)  # fmt: skip
        keys = [k for k in singles[0] if k.startswith("us/req")]
        print("\n| measure (medians) | value |\n|---|---:|")
        print(f"| one process, concurrency 32: infer/s | "
              f"{statistics.median(s['throughput'] for s in singles):,.0f} |")  # fmt: skip
        for k in sorted(keys, key=lambda k: -statistics.median(s.get(k, 0) for s in singles)):
            value = statistics.median(s.get(k, 0.0) for s in singles)
            if value >= 0.5:
                print(f"| CPU {k.removeprefix('us/req ')}: us per request | {value:.0f} |")
        print(f"| event loop thread busy (CPU s / wall s) | "
              f"{statistics.median(s['loop busy'] for s in singles):.2f} |")  # fmt: skip
        print(f"| two processes, concurrency 16 each: infer/s together | "
              f"{statistics.median(pairs):,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
