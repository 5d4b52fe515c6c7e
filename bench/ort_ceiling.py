"""What onnxruntime alone does with a model on this machine: the ceiling no server reaches.

Times bench/vs_triton.py's MLP or convnet in this process, with onnxruntime's default threads
(and, for comparison, one thread), at several batch sizes: no server, no sockets, no load
generator sharing the cores. Run it right after bench/vs_triton.py, on the same machine, to
read that run's served rates against it: a served rate can only approach this one, so a target
above it cannot be met by any front end.

    .venv/bin/python bench/ort_ceiling.py --model convnet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_triton import BUILDERS, MODELS  # noqa: E402


def rate(session: ort.InferenceSession, batch: int, dims: list[int], seconds: float) -> float:
    """Inferences per second over `seconds` of back-to-back runs at `batch`."""
    feed = {session.get_inputs()[0].name: np.random.rand(batch, *dims).astype(np.float32)}
    session.run(None, feed)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(None, feed)
        runs += 1
    return runs * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("mlp", "convnet"), default="convnet")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="median of")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = BUILDERS[args.model](Path(tmp) / f"{args.model}.onnx")
        dims = MODELS[args.model][0]
        print(f"| threads | {' | '.join(f'batch {b}' for b in args.batches)} |")
        print(f"|---|{'---:|' * len(args.batches)}")
        for threads in (0, 1):  # 0: onnxruntime's default (one per physical core)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            cells = [
                statistics.median(rate(session, b, dims, args.seconds) for _ in range(args.repeats))
                for b in args.batches
            ]
            label = "onnxruntime default" if threads == 0 else "1"
            print(f"| {label} | {' | '.join(f'{c:,.0f}' for c in cells)} |", flush=True)


if __name__ == "__main__":
    main()
