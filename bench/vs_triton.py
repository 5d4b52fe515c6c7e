"""pipeserve against Triton, each on its defaults, as a new user would compare them.

Both servers are up at once and measured in alternating rounds (the order flips every round, so
drift on a shared machine hits both alike). The same ONNX files, each with `max_batch_size: 32`,
`dynamic_batching { max_queue_delay_microseconds: 0 }` and one CPU instance:

- pipeserve with its defaults (no thread parameters);
- Triton 2.51 (the tritonserver binary in the nvidia-pytriton wheel) with a Python-backend model
  calling onnxruntime with onnxruntime's default threads (bench/triton_reference.py).

Rows (perf_analyzer, batch 1 per request), each in perf_analyzer's default sync mode and with
`--async`:

    add-one model, concurrency 1, unary | add-one, concurrency 1, streaming |
    add-one, concurrency 32 | MLP 512-2048-2048-512, concurrency 32 | 8-layer convnet, conc. 8

Reported per row and mode: throughput and p50 of each server (medians over rounds), their
ratios, and each server's CPU time per request (process tree CPU seconds / requests answered in
the window, from /proc): the per-request cost issue 15 asks to halve.

    .venv/bin/python bench/vs_triton.py --triton \\
        /work/pytriton/lib/python3.11/site-packages/pytriton/tritonserver --rounds 2

`--pipeserve-src DIR` serves another checkout's `server/` (e.g. a worktree of an older commit)
for before/after figures in the same session; `--before-src DIR` adds that checkout as a third
server ("before") in the same rounds, so a change's before/after figures come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_reference  # noqa: E402
from batching import _free_port, mlp, serve_command, started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402

MAX_BATCH = 32
ADD_ONE_WIDTH = 16
CONV_CHANNELS, CONV_LAYERS, IMAGE = 16, 8, 224

# name -> (model file builder, input dims, output dims)
MODELS = {
    "add_one": ([ADD_ONE_WIDTH], [ADD_ONE_WIDTH]),
    "mlp": ([512], [512]),
    "convnet": ([3, IMAGE, IMAGE], [CONV_CHANNELS]),
    "pool": ([3, IMAGE, IMAGE], [3]),
    "image": ([3, IMAGE, IMAGE], [3, IMAGE, IMAGE]),
}
# (label, model, concurrency, streaming)
ROWS = (
    ("add-one, c=1, unary", "add_one", 1, False),
    ("add-one, c=1, streaming", "add_one", 1, True),
    ("add-one, c=32", "add_one", 32, False),
    ("MLP, c=32", "mlp", 32, False),
    ("convnet, c=8", "convnet", 8, False),
)
MODES = ("sync", "async")


def add_one(path: Path) -> Path:
    one = numpy_helper.from_array(np.ones(ADD_ONE_WIDTH, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ADD_ONE_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ADD_ONE_WIDTH])],
        initializer=[one],
    )
    return _save(graph, path)


def convnet(path: Path) -> Path:
    """Eight 3x3 convolutions (the first with stride 2) with ReLU, then global average pooling:
    compute-bound, a few hundred MFLOP per image."""
    rng = np.random.default_rng(0)
    nodes, inits, current, channels = [], [], "x", 3
    for i in range(CONV_LAYERS):
        w = rng.standard_normal((CONV_CHANNELS, channels, 3, 3)).astype(np.float32)
        w = (w * np.sqrt(2 / (9 * channels))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(CONV_CHANNELS, np.float32), f"b{i}"))
        stride = 2 if i == 0 else 1
        nodes.append(
            helper.make_node(
                "Conv",
                [current, f"w{i}", f"b{i}"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        current, channels = f"r{i}", CONV_CHANNELS
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CONV_CHANNELS])],
        initializer=inits,
    )
    return _save(graph, path)


def pool(path: Path) -> Path:
    """The convnet's input (a 602 KB image per request) averaged per channel: next to no
    compute, so what a request costs is the front end's cost of a large tensor."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["y"]),
        ],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return _save(graph, path)


def image(path: Path) -> Path:
    """The convnet's input answered as it came (Identity): a 602 KB tensor each way."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
    )
    return _save(graph, path)


# name -> the function that writes that model's ONNX file
BUILDERS = {"add_one": add_one, "mlp": mlp, "convnet": convnet, "pool": pool, "image": image}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _io(name: str) -> str:
    dims_in, dims_out = MODELS[name]
    return (
        f'input [{{ name: "x" data_type: TYPE_FP32 dims: {dims_in} }}]\n'
        f'output [{{ name: "y" data_type: TYPE_FP32 dims: {dims_out} }}]\n'
    )


def write_pipeserve_repository(root: Path, files: dict[str, Path]) -> Path:
    for name, model in files.items():
        folder = root / name
        (folder / "1").mkdir(parents=True)
        os.link(model, folder / "1" / "model.onnx")
        (folder / "config.pbtxt").write_text(
            f'name: "{name}"\nmax_batch_size: {MAX_BATCH}\n{_io(name)}'
            "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
            "instance_group [{ kind: KIND_CPU count: 1 }]\n"
        )
    return root


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant (Triton's Python-backend
    stubs are child processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def answered(url: str, model: str) -> int:
    """Requests the server has answered for `model` (its ModelStatistics: both servers keep it)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        return int(client.get_inference_statistics(model).model_stats[0].inference_count)
    finally:
        client.close()


def measure(
    url: str, pid: int, row: tuple[str, str, int, bool], mode: str, window: float
) -> dict[str, float]:
    _, model, concurrency, streaming = row
    dims = MODELS[model][0]
    shape = "x:" + ",".join(map(str, dims))
    cpu0, n0 = cpu_seconds(pid), answered(url, model)
    load = run_perf_analyzer(url, model, concurrency, window, shape, mode=mode, streaming=streaming)
    cpu, requests = cpu_seconds(pid) - cpu0, answered(url, model) - n0
    return dict(
        throughput=load.throughput,
        p50_us=load.p50_us,
        # Everything the server process tree spent over the whole perf_analyzer run (warm-up
        # included) per request it answered in that time.
        cpu_us_per_request=cpu / requests * 1e6 if requests else 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton", type=Path, required=True, help="PyTriton's tritonserver folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=1.5, help="seconds per perf window")
    parser.add_argument("--rows", nargs="+", type=int, help="row indices (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--pipeserve-src", type=Path, help="serve this checkout's server/")
    parser.add_argument(
        "--before-src", type=Path, help="also serve this checkout's server/ as 'before'"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/out/vs_triton.json"))
    args = parser.parse_args()
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")
    rows = [ROWS[i] for i in args.rows] if args.rows else list(ROWS)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        files = {name: BUILDERS[name](root / f"{name}.onnx") for name in MODELS}
        repo = write_pipeserve_repository(root / "repo", files)
        triton_repo = root / "triton"
        for name, model in files.items():
            triton_reference.write_repository(triton_repo, model, MAX_BATCH, _io(name), name)
        env = dict(os.environ)
        if args.pipeserve_src is not None:
            env["PYTHONPATH"] = str(args.pipeserve_src.resolve() / "server")
        servers = {
            "pipeserve": stack.enter_context(
                started(serve_command(repo), "pipeserve ready", r"grpc=\S+:(\d+)", env)
            ),
            **(
                {
                    "before": stack.enter_context(
                        started(
                            serve_command(repo),
                            "pipeserve ready",
                            r"grpc=\S+:(\d+)",
                            {**env, "PYTHONPATH": str(args.before_src.resolve() / "server")},
                        )
                    )
                }
                if args.before_src is not None
                else {}
            ),
            "triton": stack.enter_context(
                started(
                    triton_reference.command(
                        args.triton,
                        triton_repo,
                        triton_reference.backends(args.triton, root / "backends"),
                        _free_port(),
                    ),
                    "Started GRPCInferenceService",
                    r"GRPCInferenceService at \S+:(\d+)",
                    triton_reference.environment(0),  # onnxruntime's default threads
                )
            ),
        }
        results: list[dict] = []
        for r in range(args.rounds):
            for row in rows:
                for mode in args.modes:
                    names = tuple(servers)
                    order = names if r % 2 == 0 else names[::-1]
                    for server in order:
                        port, pid = servers[server]
                        m = measure(f"127.0.0.1:{port}", pid, row, mode, args.window)
                        results.append(dict(round=r, row=row[0], mode=mode, server=server, **m))
                        print(
                            f"r{r} {row[0]:<24} {mode:<5} {server:<9} "
                            f"{m['throughput']:9.1f}/s p50 {m['p50_us'] / 1000:7.3f} ms "
                            f"cpu {m['cpu_us_per_request']:7.0f} us/req",
                            flush=True,
                        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(render(results, rows, args.modes))


def render(results: list[dict], rows: list[tuple[str, str, int, bool]], modes: list[str]) -> str:
    def med(row: str, mode: str, server: str, key: str) -> float:
        return statistics.median(
            x[key] for x in results if (x["row"], x["mode"], x["server"]) == (row, mode, server)
        )

    before = any(x["server"] == "before" for x in results)
    extra = " before infer/s | after/before | before p50 ms | before CPU us/req |"
    lines = [
        "| case | perf_analyzer mode | pipeserve infer/s | Triton infer/s | throughput ratio "
        "| pipeserve p50 ms | Triton p50 ms | p50 ratio | pipeserve CPU us/req "
        "| Triton CPU us/req |" + (extra if before else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if before else ""),
    ]
    for label, *_ in rows:
        for mode in modes:
            pt, tt = (
                med(label, mode, "pipeserve", "throughput"),
                med(label, mode, "triton", "throughput"),
            )
            pp, tp = med(label, mode, "pipeserve", "p50_us"), med(label, mode, "triton", "p50_us")
            pc = med(label, mode, "pipeserve", "cpu_us_per_request")
            tc = med(label, mode, "triton", "cpu_us_per_request")
            line = (
                f"| {label} | {mode} | {pt:,.0f} | {tt:,.0f} | {pt / tt:.2f} | {pp / 1000:.2f} "
                f"| {tp / 1000:.2f} | {pp / tp:.2f} | {pc:,.0f} | {tc:,.0f} |"
            )
            if before:
                bt = med(label, mode, "before", "throughput")
                bp = med(label, mode, "before", "p50_us")
                bc = med(label, mode, "before", "cpu_us_per_request")
                line += f" {bt:,.0f} | {pt / bt:.2f} | {bp / 1000:.2f} | {bc:,.0f} |"
            lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
