"""Pipeline parallelism on GPUs: 1 GPU vs an N-stage pipeline over N GPUs.

    .venv/bin/python bench/pipeline_gpu.py [--weight-gib G] [--batches 1,8,32] [--seconds 5]

Where no CUDA device is usable it says so and exits 0 without measuring anything.

On a GPU machine it
1. checks correctness: a small wide MLP through CUDA stages (IOBinding, activations kept on the
   device) against one CUDA session, within 1e-3 relative;
2. measures rows/s for batch sizes on a model that fits one GPU: 1 GPU vs N stages on N GPUs
   (with one GPU: 2 stages on the same GPU, which only exercises the code path);
3. with 2+ GPUs, builds a model whose weights exceed one GPU's free memory (default: 1.3x the
   smallest GPU's free memory, capped by the disk), shows one GPU failing to load it and measures
   the N-GPU pipeline serving it.
Weights are written as external data (one file) in a temporary folder beside --workdir.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import closed_loop  # noqa: E402

from pipeserve.errors import PipeserveError
from pipeserve.inference import ModelSpec, TensorSpec
from pipeserve.runtime.pipeline.executor import create_pipeline_runner


def cuda_devices() -> list[int]:
    """Free bytes of each visible CUDA device (empty without a usable driver)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return []
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return []
    count = ctypes.c_int(0)
    if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0:
        return []
    free_bytes = []
    for device in range(count.value):
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.cudaSetDevice(device)
        lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        free_bytes.append(int(free.value))
    return free_bytes


def wide_mlp(folder: Path, width: int, layers: int) -> Path:
    """x[b, width] -> `layers` x (MatMul + Relu), fp32 weights in one external file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, inits = [], []
    with open(folder / "weights.bin", "wb") as out:
        for i in range(layers):
            offset = out.tell()
            out.write(block.tobytes())  # the same values each layer: the size is what matters
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", "weights.bin"),
                ("offset", str(offset)),
                ("length", str(block.nbytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            source = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [source, f"W{i}"], [f"a{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def one_gpu(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"device_id": 0})])


def pipeline(path: Path, devices: list[str], width: int):  # type: ignore[no-untyped-def]
    spec = ModelSpec("wide", 1, 4096, (TensorSpec("x", "FP32", (width,)),), ())
    params = {"pipeline_devices": ",".join(devices), "pipeline_cost": "estimate"}
    runner = create_pipeline_runner(path, params, spec)
    assert runner is not None
    return runner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weight-gib", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    free = cuda_devices()
    if not free:
        print(
            "pipeline_gpu: no usable CUDA device here (onnxruntime providers: "
            f"{ort.get_available_providers()}); nothing measured. Run this on a GPU machine."
        )
        return 0
    gpus = len(free)
    print(f"{gpus} GPU(s), free memory GiB: {[round(f / 2**30, 1) for f in free]}")
    devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else ["cuda:0", "cuda:0"]
    width = args.width
    layer_bytes = width * width * 4
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small = wide_mlp(Path(tmp) / "small", width, 8)
        x = np.random.default_rng(1).standard_normal((8, width)).astype(np.float32)
        want = one_gpu(small).run(["y"], {"x": x})[0]
        runner = pipeline(small, devices, width)
        got = runner.run(0, {"x": x}, ["y"])["y"]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        print(f"correctness: {len(devices)} CUDA stages == 1 CUDA session (rtol 1e-3)")
        print("\n| batch | 1 GPU (rows/s) | pipeline " + "+".join(devices) + " (rows/s) | ratio |")
        print("|---:|---:|---:|---:|")
        session = one_gpu(small)
        for batch in (int(b) for b in args.batches.split(",")):
            xb = np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)
            session.run(["y"], {"x": xb})
            runner.run(0, {"x": xb}, ["y"])
            s = closed_loop(lambda i, xb=xb: session.run(["y"], {"x": xb}), 1, args.seconds) * batch
            p = (
                closed_loop(
                    lambda i, xb=xb: runner.run(0, {"x": xb}, ["y"]),
                    runner.slot_count,
                    args.seconds,
                )
                * batch
            )
            print(f"| {batch} | {s:.0f} | {p:.0f} | {p / s:.2f}x |")
        runner.close()
        if gpus < 2:
            print("\none GPU: no model that needs several GPUs' memory can be measured here")
            return 0
        want_bytes = args.weight_gib * 2**30 if args.weight_gib else 1.3 * min(free)
        layers = max(2, int(want_bytes // layer_bytes))
        disk = shutil.disk_usage(tmp).free
        if layers * layer_bytes > 0.8 * disk:
            print(f"\nnot enough disk for {layers * layer_bytes / 2**30:.1f} GiB of weights")
            return 1
        big = wide_mlp(Path(tmp) / "big", width, layers)
        print(f"\nbig model: {layers} layers, {layers * layer_bytes / 2**30:.1f} GiB of weights")
        try:
            one_gpu(big).run(["y"], {"x": x})
            print("1 GPU: loaded and ran (the model fits one GPU after all)")
        except Exception as exc:  # the expected outcome: out of memory
            print(f"1 GPU: failed as expected: {str(exc).splitlines()[0][:160]}")
        try:
            runner = pipeline(big, [f"cuda:{i}" for i in range(gpus)], width)
        except PipeserveError as exc:
            print(f"{gpus}-GPU pipeline failed to load: {exc}")
            return 1
        for batch in (int(b) for b in args.batches.split(",")):
            xb = np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)
            runner.run(0, {"x": xb}, ["y"])
            r = (
                closed_loop(
                    lambda i, xb=xb: runner.run(0, {"x": xb}, ["y"]),
                    runner.slot_count,
                    args.seconds,
                )
                * batch
            )
            print(f"{gpus}-GPU pipeline, batch {batch}: {r:.0f} rows/s")
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
