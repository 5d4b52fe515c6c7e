"""Run Triton's own Python example clients against pipeserve, unchanged, and say which pass.

The examples live in Triton's client repository (src/python/examples/), not in any wheel, so
point this at a checkout of it:

    git clone https://github.com/triton-inference-server/client /tmp/triton-client
    .venv/bin/python scripts/triton_examples.py /tmp/triton-client

It lays out the models those scripts ask for as ONNX graphs run by onnxruntime (`simple`:
INT32 sum and difference; `simple_string`: the same on numbers written as strings;
`simple_int8`; `simple_identity` and `custom_identity_int32`; `densenet_onnx`: a small
convnet with Triton's input and output names and a labels file), and starts `pipeserve serve`
with `--server-name triton` (the health examples check the name) in explicit model control
(the model-control examples load and unload). The model-control examples count the models in
the repository (8 over gRPC, 7 over HTTP, as in Triton's test repository), so each gets a
server whose repository holds that many. Each example runs with this interpreter; its exit
status is the verdict. The image examples need Pillow (and `attrdict` for HTTP).

Examples for what pipeserve does not serve (shared memory, sequence batching, decoupled
models, ensembles) are listed as not run, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]

# Example -> its arguments (one run each). All talk to localhost:8000 / :8001, their default.
RUNS: list[tuple[str, str]] = [
    ("simple_grpc_infer_client.py", ""),
    ("simple_grpc_async_infer_client.py", ""),
    ("simple_grpc_aio_infer_client.py", ""),
    ("simple_grpc_health_metadata.py", ""),
    ("simple_grpc_string_infer_client.py", ""),
    ("simple_grpc_custom_args_client.py", ""),
    ("simple_grpc_keepalive_client.py", ""),
    ("grpc_explicit_int_content_client.py", ""),
    ("grpc_explicit_byte_content_client.py", ""),
    ("grpc_explicit_int8_content_client.py", ""),
    ("grpc_client.py", ""),
    ("simple_http_infer_client.py", ""),
    (
        "simple_http_infer_client.py",
        "--request-compression-algorithm gzip --response-compression-algorithm deflate",
    ),
    (
        "simple_http_infer_client.py",
        "--request-compression-algorithm deflate --response-compression-algorithm gzip",
    ),
    ("simple_http_async_infer_client.py", ""),
    ("simple_http_aio_infer_client.py", ""),
    # (Request compression from the aio client needs tritonclient > 2.41: 2.41's lacks an
    # `import gzip`.)
    ("simple_http_aio_infer_client.py", "--response-compression-algorithm gzip"),
    ("simple_http_health_metadata.py", ""),
    ("simple_http_string_infer_client.py", ""),
    ("memory_growth_test.py", "-i grpc -r 20"),
    ("memory_growth_test.py", "-i http -r 20"),
    ("image_client.py", "-m densenet_onnx -c 3 -s INCEPTION IMAGE"),
    ("image_client.py", "-m densenet_onnx -c 3 -s VGG -a IMAGE"),
    ("image_client.py", "-m densenet_onnx -c 2 -s NONE -i grpc -u localhost:8001 IMAGE"),
    (
        "image_client.py",
        "-m densenet_onnx -c 2 -s NONE -i grpc -u localhost:8001 --streaming IMAGE",
    ),
    ("grpc_image_client.py", "-m densenet_onnx -c 3 -s INCEPTION IMAGE"),
]
# Model-control examples: example -> how many models its repository must hold.
CONTROL = [("simple_grpc_model_control.py", 8), ("simple_http_model_control.py", 7)]
NOT_SERVED = {
    "shared memory (UNIMPLEMENTED, README 'Not done yet')": ("shm", "reuse_infer_objects"),
    "sequence batching (refused at load)": ("sequence",),
    "decoupled models": ("custom_repeat",),
    "ensembles": ("ensemble",),
}


def _save(graph: onnx.GraphProto, folder: Path, config: str) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime 1.31 reads IR <= 13
    (folder / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config)


def _config(name: str, dtype: str, inputs: list[str], outputs: list[str], dims: str) -> str:
    text = f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    for i in inputs:
        text += f'input [ {{ name: "{i}" data_type: {dtype} dims: {dims} }} ]\n'
    for o in outputs:
        text += f'output [ {{ name: "{o}" data_type: {dtype} dims: {dims} }} ]\n'
    return text


def _sum_and_difference(root: Path, name: str, elem: int, as_strings: bool = False) -> None:
    vi = helper.make_tensor_value_info
    io = TensorProto.STRING if as_strings else elem
    nodes, a, b = [], "INPUT0", "INPUT1"
    if as_strings:  # numbers written as strings: parsed, summed, written back
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        ]
        a, b = "a", "b"
    s, d = ("s", "d") if as_strings else ("OUTPUT0", "OUTPUT1")
    nodes += [helper.make_node("Add", [a, b], [s]), helper.make_node("Sub", [a, b], [d])]
    if as_strings:
        nodes += [
            helper.make_node("Cast", ["s"], ["OUTPUT0"], to=TensorProto.STRING),
            helper.make_node("Cast", ["d"], ["OUTPUT1"], to=TensorProto.STRING),
        ]
    shape: list[str | int | None] = ["batch", 16]
    graph = helper.make_graph(
        nodes,
        name,
        [vi("INPUT0", io, shape), vi("INPUT1", io, shape)],
        [vi("OUTPUT0", io, shape), vi("OUTPUT1", io, shape)],
    )
    dtype = "TYPE_" + ("STRING" if as_strings else TensorProto.DataType.Name(elem))
    _save(
        graph,
        root / name,
        _config(name, dtype, ["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"], "[ 16 ]"),
    )


def _identity(root: Path, name: str, elem: int) -> None:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [vi("INPUT0", elem, ["batch", "n"])],
        [vi("OUTPUT0", elem, ["batch", "n"])],
    )
    dtype = "TYPE_" + TensorProto.DataType.Name(elem)
    _save(graph, root / name, _config(name, dtype, ["INPUT0"], ["OUTPUT0"], "[ -1 ]"))


def _densenet_like(root: Path) -> None:
    """Triton's densenet_onnx names and shapes (no batching, data_0 [3,224,224] in, fc6_1
    out, a labels file): one strided convolution and a pooling, 16 classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["data_0", "axis0"], ["batched"]),
            helper.make_node("Conv", ["batched", "w"], ["c"], pads=[1, 1, 1, 1], strides=[4, 4]),
            helper.make_node("GlobalAveragePool", ["c"], ["pooled"]),
            helper.make_node("Reshape", ["pooled", "flat"], ["fc6_1"]),
        ],
        "densenet_onnx",
        [vi("data_0", TensorProto.FLOAT, [3, 224, 224])],
        [vi("fc6_1", TensorProto.FLOAT, [16])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([16], np.int64), "flat"),
        ],
    )
    folder = root / "densenet_onnx"
    _save(
        graph,
        folder,
        'name: "densenet_onnx"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "data_0" data_type: TYPE_FP32 format: FORMAT_NCHW\n'
        "          dims: [ 3, 224, 224 ] } ]\n"
        'output [ { name: "fc6_1" data_type: TYPE_FP32 dims: [ 16 ]\n'
        '           label_filename: "labels.txt" } ]\n',
    )
    (folder / "labels.txt").write_text("".join(f"CLASS_{i}\n" for i in range(16)))


def repository(root: Path) -> Path:
    _sum_and_difference(root, "simple", TensorProto.INT32)
    _sum_and_difference(root, "simple_int8", TensorProto.INT8)
    _sum_and_difference(root, "simple_string", TensorProto.INT32, as_strings=True)
    _identity(root, "simple_identity", TensorProto.STRING)
    _identity(root, "custom_identity_int32", TensorProto.INT32)
    _densenet_like(root)
    return root


@contextlib.contextmanager
def serving(repo: Path) -> Iterator[None]:
    cmd = [
        sys.executable, "-m", "pipeserve", "serve", "--model-repository", str(repo),
        "--model-control-mode", "explicit", "--load-model", "*", "--server-name", "triton",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "server"))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "pipeserve ready" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("pipeserve did not get ready")
        else:
            raise RuntimeError(f"pipeserve exited: {proc.wait()}")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def run(examples: Path, script: str, args: str, image: Path, python: str) -> tuple[bool, str]:
    argv = [str(image) if a == "IMAGE" else a for a in args.split()]
    done = subprocess.run(
        [python, str(examples / script), *argv],
        capture_output=True, text=True, timeout=120, cwd=examples,
    )  # fmt: skip
    last = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, (last[-1] if last else "")[:120]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "client_repo", type=Path, help="a checkout of triton-inference-server/client"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs the examples (its tritonclient is the one tried)",
    )
    args = parser.parse_args()
    examples = args.client_repo / "src" / "python" / "examples"
    if not examples.is_dir():
        sys.exit(f"{examples} is not a folder: give a checkout of triton-inference-server/client")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = root / "image.jpg"
        try:
            import numpy as np
            from PIL import Image

            Image.fromarray(
                (np.random.default_rng(0).random((240, 320, 3)) * 255).astype("uint8")
            ).save(image)
        except ImportError:
            print("Pillow is not installed: the image examples will fail to import it")
        repo = repository(root / "repo")
        with serving(repo):
            for script, script_args in RUNS:
                ok, last = run(examples, script, script_args, image, args.python)
                rows.append((f"{script} {script_args}".strip(), "pass" if ok else "FAIL", last))
        for script, models in CONTROL:
            control = root / f"control-{models}"
            shutil.copytree(repo, control)
            for extra in range(models - len(list(control.iterdir()))):
                copy = control / f"simple_copy{extra}"
                shutil.copytree(repo / "simple", copy)
                config = copy / "config.pbtxt"
                config.write_text(
                    re.sub(r'name: "simple"', f'name: "{copy.name}"', config.read_text())
                )
            for surplus in sorted(control.iterdir())[models:]:
                shutil.rmtree(surplus)
            with serving(control):
                ok, last = run(examples, script, "", image, args.python)
                rows.append((script, "pass" if ok else "FAIL", last))
    ran = {script for script, _ in RUNS} | {script for script, _ in CONTROL}
    for path in sorted(examples.glob("*.py")):
        if path.name not in ran:
            why = next(
                (r for r, keys in NOT_SERVED.items() if any(k in path.name for k in keys)),
                "not run here",
            )
            rows.append((path.name, "not run", why))
    print("| example | result | last line |\n|---|---|---|")
    for name, result, last in rows:
        print(f"| {name} | {result} | {last.replace('|', '/')} |")
    if any(result == "FAIL" for _, result, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
