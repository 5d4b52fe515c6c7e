"""The REST path: pipeserve HTTP against pipeserve gRPC and against Triton's HTTP endpoint.

Both servers are up at once, each serving the same ONNX files (`max_batch_size: 32`,
`dynamic_batching { max_queue_delay_microseconds: 0 }`, one CPU instance; Triton 2.51 from the
nvidia-pytriton wheel with a Python-backend model calling onnxruntime, bench/triton_reference.py),
and are measured in alternating rounds (the order flips every round). perf_analyzer in its
default sync mode, batch 1 per request, binary tensors:

    add-one model, concurrency 1    pipeserve HTTP | pipeserve gRPC | Triton HTTP
    MLP 512-2048-2048-512, c=32     pipeserve HTTP | pipeserve gRPC | Triton HTTP

Targets (issue 13): REST p50 at concurrency 1 <= 1.3x pipeserve's gRPC p50; REST throughput at
concurrency 32 >= Triton's HTTP throughput. Reports medians over rounds.

    .venv/bin/python bench/http_rest.py --triton \\
        /work/pytriton/lib/python3.11/site-packages/pytriton/tritonserver --rounds 2

`--before-src DIR` adds an older checkout's server/ as a fourth variant ("before HTTP") in the
same rounds: before/after of the REST path from one run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_reference  # noqa: E402
from batching import _free_port, mlp, serve_command, started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402
from vs_triton import MAX_BATCH, MODELS, _io, add_one, write_pipeserve_repository  # noqa: E402

# (label, model, concurrency)
ROWS = (("add-one, c=1", "add_one", 1), ("MLP, c=32", "mlp", 32))
# (label, server, protocol)
VARIANTS = (
    ("pipeserve HTTP", "pipeserve", "http"),
    ("pipeserve gRPC", "pipeserve", "grpc"),
    ("Triton HTTP", "triton", "http"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton", type=Path, required=True, help="PyTriton's tritonserver folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per perf window")
    parser.add_argument("--json", type=Path, default=Path("bench/out/http_rest.json"))
    parser.add_argument("--before-src", type=Path, help="also serve this checkout's server/")
    args = parser.parse_args()
    variants = VARIANTS + ((("before HTTP", "before", "http"),) if args.before_src else ())
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        files = {"add_one": add_one(root / "add_one.onnx"), "mlp": mlp(root / "mlp.onnx")}
        repo = write_pipeserve_repository(root / "repo", files)
        triton_repo = root / "triton"
        for name, model in files.items():
            triton_reference.write_repository(triton_repo, model, MAX_BATCH, _io(name), name)
        grpc_port = _free_port()
        pipeserve_cmd = [a for a in serve_command(repo) if a != "--no-http"]
        pipeserve_cmd[pipeserve_cmd.index("--grpc-port") + 1] = str(grpc_port)
        pipeserve_cmd += ["--http-port", "0"]
        http_port, _ = stack.enter_context(
            started(pipeserve_cmd, "pipeserve ready", r"http=\S+:(\d+)")
        )
        before_port = 0
        if args.before_src is not None:
            before_cmd = [*serve_command(repo), "--http-port", "0"]
            before_cmd.remove("--no-http")
            env = {**os.environ, "PYTHONPATH": str(args.before_src.resolve() / "server")}
            before_port, _ = stack.enter_context(
                started(before_cmd, "pipeserve ready", r"http=\S+:(\d+)", env)
            )
        triton_grpc, triton_http = _free_port(), _free_port()
        stack.enter_context(
            started(
                triton_reference.command(
                    args.triton,
                    triton_repo,
                    triton_reference.backends(args.triton, root / "backends"),
                    triton_grpc,
                    http_port=triton_http,
                ),
                "Started HTTPService",
                r"HTTPService at \S+:(\d+)",
                triton_reference.environment(0),  # onnxruntime's default threads
            )
        )
        urls = {
            "pipeserve HTTP": f"127.0.0.1:{http_port}",
            "pipeserve gRPC": f"127.0.0.1:{grpc_port}",
            "Triton HTTP": f"127.0.0.1:{triton_http}",
            "before HTTP": f"127.0.0.1:{before_port}",
        }
        results: list[dict] = []
        for r in range(args.rounds):
            for label, model, concurrency in ROWS:
                shape = "x:" + ",".join(map(str, MODELS[model][0]))
                order = variants if r % 2 == 0 else variants[::-1]
                for variant, _, protocol in order:
                    load = run_perf_analyzer(
                        urls[variant], model, concurrency, args.window, shape, mode="sync",
                        protocol=protocol,
                    )  # fmt: skip
                    results.append(
                        dict(round=r, row=label, variant=variant, thr=load.throughput,
                             p50_us=load.p50_us)
                    )  # fmt: skip
                    print(f"r{r} {label:<14} {variant:<15} {load.throughput:9.1f}/s "
                          f"p50 {load.p50_us / 1000:7.3f} ms", flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(render(results, variants))


def render(results: list[dict], variants: tuple[tuple[str, str, str], ...] = VARIANTS) -> str:
    def med(row: str, variant: str, key: str) -> float:
        return statistics.median(
            x[key] for x in results if (x["row"], x["variant"]) == (row, variant)
        )

    lines = [
        "| case | " + " | ".join(f"{v} infer/s, p50 ms" for v, _, _ in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for row, _, _ in ROWS:
        cells = [
            f"{med(row, v, 'thr'):,.0f}, {med(row, v, 'p50_us') / 1000:.3f}" for v, _, _ in variants
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    tiny, big = ROWS[0][0], ROWS[1][0]
    p50_ratio = med(tiny, "pipeserve HTTP", "p50_us") / med(tiny, "pipeserve gRPC", "p50_us")
    thr_ratio = med(big, "pipeserve HTTP", "thr") / med(big, "Triton HTTP", "thr")
    lines.append("")
    lines.append(f"REST p50 / gRPC p50 at {tiny}: {p50_ratio:.2f} (target <= 1.3)")
    lines.append(f"REST throughput / Triton HTTP at {big}: {thr_ratio:.2f} (target >= 1)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
