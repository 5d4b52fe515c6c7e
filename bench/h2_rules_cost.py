"""What the RFC 9113 receive checks (api/h2/rules.py) cost: ModelInfer at concurrency 32 on two
pipeserve servers up at once, one serving the `server/` of a checkout before the checks
(`git archive COMMIT server | tar -x -C DIR` makes one), one this checkout's (or --after-src),
measured in alternating rounds (the order flips every round, so drift on a shared machine hits
both alike).

    .venv/bin/python bench/h2_rules_cost.py --before-src DIR [--after-src DIR] --rounds 3

Rows: the add-one model (the transport is most of the cost per request: the harshest case for
per-frame checks) and the 512-2048-2048-512 MLP, perf_analyzer async, batch 1 per request.
Prints per-round figures, then medians and the after/before ratio per row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import mlp, serve_command, started  # noqa: E402
from loadgen import perf_analyzer_usable  # noqa: E402
from vs_triton import add_one, measure, write_pipeserve_repository  # noqa: E402

ROWS = (("add-one, c=32", "add_one", 32, False), ("MLP, c=32", "mlp", 32, False))
SERVERS = ("before", "after")
HERE = Path(__file__).resolve().parent.parent


def _command(repo: Path, src: Path) -> list[str]:
    """serve_command, less --no-http for a checkout from before the HTTP endpoint."""
    settings = (src / "server" / "pipeserve" / "settings.py").read_text()
    has_http = '"--no-http"' in settings
    return [arg for arg in serve_command(repo) if arg != "--no-http" or has_http]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-src", type=Path, required=True, help="checkout with server/")
    parser.add_argument(
        "--after-src", type=Path, default=HERE, help="checkout with server/ (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=1.5, help="seconds per perf window")
    args = parser.parse_args()
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        files = {"add_one": add_one(root / "add_one.onnx"), "mlp": mlp(root / "mlp.onnx")}
        repo = write_pipeserve_repository(root / "repo", files)
        servers = {}
        for name, src in (("before", args.before_src), ("after", args.after_src)):
            src = src.resolve()
            env = dict(os.environ, PYTHONPATH=str(src / "server"))
            servers[name] = stack.enter_context(
                started(_command(repo, src), "pipeserve ready", r"grpc=\S+:(\d+)", env)
            )
        results: list[dict] = []
        for r in range(args.rounds):
            for row in ROWS:
                for server in SERVERS if r % 2 == 0 else SERVERS[::-1]:
                    port, pid = servers[server]
                    m = measure(f"127.0.0.1:{port}", pid, row, "async", args.window)
                    results.append(dict(round=r, row=row[0], server=server, **m))
                    print(
                        f"r{r} {row[0]:<14} {server:<6} {m['throughput']:9.1f}/s "
                        f"p50 {m['p50_us'] / 1000:7.3f} ms "
                        f"cpu {m['cpu_us_per_request']:6.0f} us/req",
                        flush=True,
                    )
    print("| case | before infer/s | after infer/s | after/before | before CPU us/req "
          "| after CPU us/req |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for label, *_ in ROWS:

        def med(server: str, key: str, label: str = label) -> float:
            return statistics.median(
                x[key] for x in results if (x["row"], x["server"]) == (label, server)
            )

        before, after = med("before", "throughput"), med("after", "throughput")
        print(
            f"| {label} | {before:,.0f} | {after:,.0f} | {after / before:.2f} "
            f"| {med('before', 'cpu_us_per_request'):,.0f} "
            f"| {med('after', 'cpu_us_per_request'):,.0f} |"
        )


if __name__ == "__main__":
    main()
