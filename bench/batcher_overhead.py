"""What the schedulers themselves cost, in process, without gRPC.

1. Throughput through submit + answer with an instant runner (returns x * 2 at once) and 32
   callers on one event loop: DirectScheduler, DynamicBatcher (delay 0), with preserve_ordering,
   and in adaptive mode.
2. Latency of one caller at a time through a real onnxruntime instance (the MLP of
   bench/batching.py): fixed delay 0 vs adaptive, against calling the runner directly.

    .venv/bin/python bench/batcher_overhead.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import mlp  # noqa: E402

from pipeserve.api.generated import model_config_pb2 as mc  # noqa: E402
from pipeserve.batching.base import ModelRunner, Scheduler  # noqa: E402
from pipeserve.batching.direct import DirectScheduler  # noqa: E402
from pipeserve.batching.dynamic import DynamicBatcher  # noqa: E402
from pipeserve.batching.policy import BatchingPolicy  # noqa: E402
from pipeserve.inference import InferRequest, ModelSpec, TensorSpec  # noqa: E402
from pipeserve.runtime.instances import create_instances, plan_instances  # noqa: E402
from pipeserve.statistics import ModelStats  # noqa: E402

SPEC = ModelSpec("m", 1, 32, (TensorSpec("x", "FP32", (512,)),), (TensorSpec("y", "FP32", (512,)),))
FIXED = "dynamic_batching { }"
ORDERED = "dynamic_batching { preserve_ordering: true }"
ADAPTIVE = (
    'dynamic_batching { }\nparameters { key: "batching_mode" value: { string_value: "adaptive" } }'
)


class Instant:
    slot_count = 1

    def run(
        self, slot: int, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    def close(self) -> None:
        pass


def policy(text: str) -> BatchingPolicy:
    config = mc.ModelConfig()
    text_format.Parse(f'name: "m" max_batch_size: 32\n{text}', config)
    return BatchingPolicy.from_config(config, SPEC)


def request(x: np.ndarray) -> InferRequest:
    r = InferRequest("m", "1", "", {"x": x})
    r.batch_size = 1
    return r


async def throughput(scheduler: Scheduler, total: int = 20000, callers: int = 32) -> float:
    x = np.ones((1, 512), np.float32)
    done = 0

    async def caller() -> None:
        nonlocal done
        while done < total:
            await scheduler.submit(request(x))
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - t0
    await scheduler.close()
    return done / elapsed


async def latency_us(scheduler: Scheduler, n: int = 1000) -> float:
    x = np.ones((1, 512), np.float32)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await scheduler.submit(request(x))
        samples.append(time.perf_counter() - t0)
    await scheduler.close()
    return statistics.median(samples) * 1e6


def main() -> None:
    makers: dict[str, Callable[[], Scheduler]] = {
        "direct": lambda: DirectScheduler(SPEC, Instant(), ModelStats()),
        "dynamic, delay 0": lambda: DynamicBatcher(SPEC, Instant(), ModelStats(), policy(FIXED)),
        "dynamic, preserve_ordering": lambda: DynamicBatcher(
            SPEC, Instant(), ModelStats(), policy(ORDERED)
        ),
        "dynamic, adaptive": lambda: DynamicBatcher(
            SPEC, Instant(), ModelStats(), policy(ADAPTIVE)
        ),
    }
    print("1. instant runner, 32 callers: requests/s (best of 3)")
    for name, make in makers.items():
        best = max(asyncio.run(throughput(make())) for _ in range(3))
        print(f"   {name:<28} {best:8.0f}/s  ({1e6 / best:5.1f} us per request)")

    with tempfile.TemporaryDirectory() as tmp:
        model = mlp(Path(tmp) / "mlp.onnx")
        runner: ModelRunner = create_instances(model, plan_instances([("CPU", 1, [])], {}), "m")
        x = np.ones((1, 512), np.float32)
        direct = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(300):
                runner.run(0, {"x": x}, ["y"])
            direct.append((time.perf_counter() - t0) / 300 * 1e6)
        print("2. one caller, onnxruntime MLP, batch 1: median latency (3 rounds, interleaved)")
        print(f"   runner.run directly           {statistics.median(direct):6.0f} us")
        fixed, adaptive = [], []
        for _ in range(3):
            fixed.append(
                asyncio.run(latency_us(DynamicBatcher(SPEC, runner, ModelStats(), policy(FIXED))))
            )
            adaptive.append(
                asyncio.run(
                    latency_us(DynamicBatcher(SPEC, runner, ModelStats(), policy(ADAPTIVE)))
                )
            )
        print(f"   dynamic, delay 0              {statistics.median(fixed):6.0f} us")
        print(f"   dynamic, adaptive             {statistics.median(adaptive):6.0f} us")
        runner.close()


if __name__ == "__main__":
    main()
