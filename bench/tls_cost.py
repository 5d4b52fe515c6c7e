"""What TLS costs the gRPC front ends: ModelInfer (add-one model, batch 1, perf_analyzer async)
on two pipeserve servers up at once, one in cleartext and one with mutual TLS (certificates made
for the run), measured in alternating rounds (the order flips every round, so drift on a shared
machine hits both alike).

    .venv/bin/python bench/tls_cost.py --rounds 3 --frontend asyncio --frontend grpcio

Prints per-round figures (throughput, latency, the server's CPU per request answered), then
medians and the TLS/cleartext ratios per front end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tritonclient.grpc as grpcclient  # noqa: E402
from batching import serve_command, started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402
from vs_triton import add_one, cpu_seconds, write_pipeserve_repository  # noqa: E402

from tests.pki import CA, Issued  # noqa: E402

VARIANTS = ("cleartext", "mtls")


def answered(url: str, ca: CA | None, client: Issued | None) -> int:
    """Requests the server has answered (its ModelStatistics), asked over TLS when `ca`."""
    kw = {}
    if ca is not None and client is not None:
        kw = dict(
            ssl=True,
            root_certificates=str(ca.cert),
            private_key=str(client.key),
            certificate_chain=str(client.cert),
        )
    c = grpcclient.InferenceServerClient(url, **kw)  # type: ignore[arg-type]
    try:
        return int(c.get_inference_statistics("add_one").model_stats[0].inference_count)
    finally:
        c.close()


def timed(pid: int, count: Callable[[], int], run: Callable[[], float]) -> tuple[float, float]:
    """(throughput, server CPU microseconds per request answered during the run)."""
    cpu0, n0 = cpu_seconds(pid), count()
    throughput = run()
    cpu, n = cpu_seconds(pid) - cpu0, count() - n0
    return throughput, cpu / n * 1e6 if n else 0.0


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
        servers = {}
        for frontend in frontends:
            for variant in VARIANTS:
                cmd = [*serve_command(repo), "--grpc-frontend", frontend]
                if variant == "mtls":
                    cmd += tls_flags
                servers[frontend, variant] = stack.enter_context(
                    started(cmd, "pipeserve ready", r"grpc=\S+:(\d+)")
                )
        results: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in servers}
        for r in range(args.rounds):
            for frontend in frontends:
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    port, pid = servers[frontend, variant]
                    url = f"localhost:{port}"
                    tls = variant == "mtls"

                    def run(url: str = url, tls: bool = tls) -> float:
                        return run_perf_analyzer(
                            url,
                            "add_one",
                            args.concurrency,
                            args.window,
                            "x:16",
                            extra=perf_tls if tls else (),
                        ).throughput

                    throughput, cpu_us = timed(
                        pid,
                        lambda url=url, tls=tls: answered(  # type: ignore[misc]
                            url, ca if tls else None, client if tls else None
                        ),
                        run,
                    )
                    results[frontend, variant].append((throughput, cpu_us))
                    print(
                        f"r{r} {frontend:<8} {variant:<9} {throughput:9.1f}/s "
                        f"CPU {cpu_us:6.1f} us/req",
                        flush=True,
                    )
        print("\nmedians:")
        for frontend in frontends:
            plain = [
                statistics.median(x) for x in zip(*results[frontend, "cleartext"], strict=True)
            ]
            tls = [statistics.median(x) for x in zip(*results[frontend, "mtls"], strict=True)]
            print(
                f"{frontend:<8} cleartext {plain[0]:9.1f}/s {plain[1]:6.1f} us/req  "
                f"mTLS {tls[0]:9.1f}/s {tls[1]:6.1f} us/req  "
                f"throughput ratio {tls[0] / plain[0]:.2f}  CPU ratio {tls[1] / plain[1]:.2f}"
            )


if __name__ == "__main__":
    main()
