"""Pipeline parallelism on CPU: one session with 2 intra-op threads vs a 2-stage pipeline with
1 thread per stage, on a transformer encoder stack, side by side in one run; and the measured
bubble fraction against (p-1)/(m+p-1).

    .venv/bin/python bench/pipeline.py [--seconds 2] [--batches 1,2,4,8,16] [--repeat 2]

Throughput is measured closed-loop: the baseline runs batches back to back on its session (as
an instance with one slot does); the pipeline gets `stages` callers so that as many batches are in
flight as it has slots (as the scheduler's workers do). Each configuration runs for `--seconds`;
with --repeat N the whole comparison runs N times and medians are printed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_model import encoder_stack, save  # noqa: E402

from pipeserve.inference import ModelSpec, TensorSpec  # noqa: E402
from pipeserve.runtime.pipeline.executor import PipelineRunner, create_pipeline_runner  # noqa: E402


def closed_loop(call: Callable[[int], object], callers: int, seconds: float) -> float:
    """Calls completed per second with `callers` threads calling back to back; caller i
    calls call(i)."""
    stop = time.monotonic() + seconds
    counts = [0] * callers

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            call(i)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def baseline_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pipeline(path: Path, stages: int, micro: int | None) -> PipelineRunner:
    spec = ModelSpec("encoder", 1, 1024, (TensorSpec("x", "FP32", (-1, -1)),), ())
    params = {
        "pipeline_devices": ",".join(["cpu"] * stages),
        "pipeline_threads_per_stage": "1",
        "pipeline_cost": "profile",
    }
    if micro:
        params["micro_batch_size"] = str(micro)
    runner = create_pipeline_runner(path, params, spec)
    assert runner is not None
    return runner


def throughput_rows(path: Path, batches: list[int], seq: int, seconds: float) -> list[dict]:
    rng = np.random.default_rng(0)
    session = baseline_session(path, threads=2)
    instances = [baseline_session(path, threads=1) for _ in range(2)]
    runner = pipeline(path, 2, None)
    rows = []
    try:
        for batch in batches:
            x = rng.standard_normal((batch, seq, 256)).astype(np.float32)
            session.run(None, {"x": x})
            runner.run(0, {"x": x}, ["y"])
            single = closed_loop(lambda i, x=x: session.run(["y"], {"x": x}), 1, seconds)
            # Data parallelism, what instance_group count 2 gives: 2 sessions x 1 thread.
            replicated = closed_loop(lambda i, x=x: instances[i].run(["y"], {"x": x}), 2, seconds)
            piped = closed_loop(
                lambda i, x=x: runner.run(i, {"x": x}, ["y"]), runner.slot_count, seconds
            )
            rows.append(
                {
                    "batch": batch,
                    "single": single * batch,
                    "pipeline": piped * batch,
                    "instances": replicated * batch,
                }
            )
    finally:
        runner.close()
    return rows


def bubble_rows(path: Path, batch: int, seq: int, seconds: float) -> list[dict]:
    """One caller, so one batch in the pipeline at a time: the bubble is the pipeline's own."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, seq, 256)).astype(np.float32)
    rows = []
    for micro in (batch, batch // 2, batch // 4, batch // 8):
        if micro < 1:
            continue
        runner = pipeline(path, 2, micro)
        try:
            runner.run(0, {"x": x}, ["y"])
            runner.reset_stats()
            closed_loop(lambda i, runner=runner: runner.run(i, {"x": x}, ["y"]), 1, seconds)
            stats = runner.stage_stats()
        finally:
            runner.close()
        m = -(-batch // micro)
        rows.append(
            {
                "micro": micro,
                "m": m,
                "measured": stats.bubble_fraction,
                "theory": (2 - 1) / (m + 2 - 1),
                "split": [
                    round(s.compute_ns / max(1, sum(t.compute_ns for t in stats.stages)), 2)
                    for s in stats.stages
                ],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = save(encoder_stack(layers=args.layers), Path(tmp) / "encoder")
        runs = [throughput_rows(path, batches, args.seq, args.seconds) for _ in range(args.repeat)]
        bubbles = [bubble_rows(path, 8, args.seq, args.seconds) for _ in range(args.repeat)]
    print(
        f"encoder stack: {args.layers} layers, width 256, 4 heads, ffn 1024, seq {args.seq}; "
        f"{args.repeat} run(s), medians\n"
    )
    print(
        "| batch | 1 session x 2 threads | 2 stages x 1 thread | pipeline / session "
        "| 2 sessions x 1 thread | pipeline / 2 sessions |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for i, batch in enumerate(batches):
        single = statistics.median(r[i]["single"] for r in runs)
        piped = statistics.median(r[i]["pipeline"] for r in runs)
        replicated = statistics.median(r[i]["instances"] for r in runs)
        ratios = [r[i]["pipeline"] / r[i]["single"] for r in runs]
        versus = [r[i]["pipeline"] / r[i]["instances"] for r in runs]
        print(
            f"| {batch} | {single:.1f} | {piped:.1f} | {statistics.median(ratios):.2f}x "
            f"({', '.join(f'{x:.2f}' for x in ratios)}) | {replicated:.1f} | "
            f"{statistics.median(versus):.2f}x ({', '.join(f'{x:.2f}' for x in versus)}) |"
        )
    print("\n(rows/s; ratios: median, then each run's)")
    print("\nbubble fraction, 2 stages, batch 8, one batch in flight:\n")
    print("| micro-batch | m | measured | theory (p-1)/(m+p-1) | stage compute split |")
    print("|---:|---:|---:|---:|---|")
    for i, row in enumerate(bubbles[0]):
        measured = statistics.median(b[i]["measured"] for b in bubbles)
        print(
            f"| {row['micro']} | {row['m']} | {measured:.2f} | {row['theory']:.2f} | "
            f"{row['split']} |"
        )


if __name__ == "__main__":
    main()
