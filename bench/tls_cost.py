"""What TLS costs the gRPC front ends: ModelInfer (add-one model, batch 1, perf_analyzer async)
on two pipeserve servers up at once, one in cleartext and one with mutual TLS (certificates made
for the run), measured in alternating rounds (the order flips every round, so drift on a shared
machine hits both alike).

    .venv/bin/python bench/tls_cost.py --rounds 3 --frontend asyncio --frontend grpcio

Prints per-round figures, then medians and the TLS/cleartext throughput ratio per front end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from batching import serve_command, started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402
from vs_triton import add_one, write_pipeserve_repository  # noqa: E402

from tests.pki import CA  # noqa: E402

VARIANTS = ("cleartext", "mtls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per perf window")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--frontend", action="append", choices=("asyncio", "grpcio"))
    args = parser.parse_args()
    frontends = args.frontend or ["asyncio"]
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {"add_one": add_one(root / "m.onnx")})
        ca = CA(root / "pki", "ca")
        server, client = ca.issue("server", server=True), ca.issue("client", server=False)
        tls_flags = [
            "--grpc-tls-cert", str(server.cert), "--grpc-tls-key", str(server.key),
            "--grpc-tls-client-ca", str(ca.cert),
        ]  # fmt: skip
        perf_tls = (
            "--ssl-grpc-use-ssl", "true",
            "--ssl-grpc-root-certifications-file", str(ca.cert),
            "--ssl-grpc-private-key-file", str(client.key),
            "--ssl-grpc-certificate-chain-file", str(client.cert),
        )  # fmt: skip
        ports = {}
        for frontend in frontends:
            for variant in VARIANTS:
                cmd = [*serve_command(repo), "--grpc-frontend", frontend]
                if variant == "mtls":
                    cmd += tls_flags
                port, _ = stack.enter_context(started(cmd, "pipeserve ready", r"grpc=\S+:(\d+)"))
                ports[frontend, variant] = port
        results: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
        for r in range(args.rounds):
            for frontend in frontends:
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    load = run_perf_analyzer(
                        f"localhost:{ports[frontend, variant]}",
                        "add_one",
                        args.concurrency,
                        args.window,
                        "x:16",
                        extra=perf_tls if variant == "mtls" else (),
                    )
                    results[frontend, variant].append(load.throughput)
                    print(
                        f"r{r} {frontend:<8} {variant:<9} {load.throughput:9.1f}/s "
                        f"p50 {load.p50_us / 1000:7.3f} ms p99 {load.p99_us / 1000:7.3f} ms",
                        flush=True,
                    )
        print("\nmedians (inferences/s):")
        for frontend in frontends:
            plain = statistics.median(results[frontend, "cleartext"])
            tls = statistics.median(results[frontend, "mtls"])
            print(f"{frontend:<8} cleartext {plain:9.1f}  mTLS {tls:9.1f}  ratio {tls / plain:.2f}")


if __name__ == "__main__":
    main()
