"""Which HTTP library drives pipeserve's REST front end: uvicorn (its httptools protocol driving
the plain ASGI callable of api/http/server.py) against aiohttp's low-level server
(`aiohttp.web_server.Server`, no web application), on the REST infer path.

Both serve the very same `api.http.routes.Router` over the same DataPlane in one `pipeserve`
process each (gRPC beside, as in production); only the HTTP library differs. perf_analyzer
`-i http` (binary tensors, its default sync mode) on the tiny add-one model at concurrency 1 and
32; both servers are up at once and measured in alternating rounds. Reports throughput, p50 and
the server's CPU time per request (medians over rounds), and the ratio aiohttp / uvicorn.

    .venv/bin/python bench/http_libraries.py --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import started  # noqa: E402
from loadgen import perf_analyzer_usable, run_perf_analyzer  # noqa: E402
from vs_triton import ADD_ONE_WIDTH, add_one, cpu_seconds, write_pipeserve_repository  # noqa: E402

LIBRARIES = ("uvicorn", "aiohttp")
CONCURRENCIES = (1, 32)


async def serve(library: str, repository: Path) -> None:
    """One pipeserve App (gRPC on, its own HTTP off) plus an HTTP listener on `library`."""
    from pipeserve.api.http.listener import HttpLimits, HttpServer
    from pipeserve.api.http.routes import Request, Router
    from pipeserve.api.http.server import HttpApp
    from pipeserve.app import App
    from pipeserve.settings import Settings

    settings = Settings(
        model_repository=repository, host="127.0.0.1", grpc_port=0, metrics=False, http=False
    )
    app = App(settings)
    await app.start()
    router = Router(app.data_plane, settings.max_message_bytes)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if library == "uvicorn":
        http = HttpServer(HttpApp(router, settings.max_message_bytes), "127.0.0.1", 0, HttpLimits())
        await http.start()
        print(f"listening http=127.0.0.1:{http.port}", flush=True)
        await stop.wait()
        await http.stop(1)
    else:
        from aiohttp import web, web_server

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            headers = {k.lower().encode(): v.encode() for k, v in request.headers.items()}
            answer = await router.dispatch(Request(request.method, request.path, headers, body))
            response = web.Response(status=answer.status, body=b"".join(answer.chunks))
            for name, value in answer.headers:
                response.headers[name.decode()] = value.decode()
            if answer.content_type is not None:
                response.headers["Content-Type"] = answer.content_type.decode()
            return response

        server = web_server.Server(handle)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        print(f"listening http=127.0.0.1:{port}", flush=True)
        await stop.wait()
        listener.close()
        await server.shutdown(1)
    await app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per perf window")
    parser.add_argument("--serve", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--repository", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.repository))
        return
    if not perf_analyzer_usable():
        sys.exit("perf_analyzer does not start here (see bench/loadgen.py)")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        repo = write_pipeserve_repository(root / "repo", {"add_one": add_one(root / "a.onnx")})
        servers = {
            lib: stack.enter_context(
                started(
                    [sys.executable, __file__, "--serve", lib, "--repository", str(repo)],
                    "listening http=",
                    r"http=\S+:(\d+)",
                )
            )
            for lib in LIBRARIES
        }
        results: list[dict] = []
        for r in range(args.rounds):
            for c in CONCURRENCIES:
                for lib in LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]:
                    port, pid = servers[lib]
                    url = f"127.0.0.1:{port}"
                    cpu0, n0 = cpu_seconds(pid), answered(url)
                    load = run_perf_analyzer(
                        url, "add_one", c, args.window, f"x:{ADD_ONE_WIDTH}", mode="sync",
                        protocol="http",
                    )  # fmt: skip
                    # CPU time of the server per request it answered: the least noisy figure
                    # on a shared machine.
                    cpu_us = (cpu_seconds(pid) - cpu0) / max(1, answered(url) - n0) * 1e6
                    m = dict(thr=load.throughput, p50=load.p50_us, cpu=cpu_us)
                    results.append(dict(round=r, c=c, lib=lib, **m))
                    print(f"r{r} c={c:<3} {lib:<8} {load.throughput:8.1f}/s "
                          f"p50 {load.p50_us / 1000:7.3f} ms cpu {cpu_us:6.0f} us/req",
                          flush=True)  # fmt: skip
    print(render(results))


def answered(url: str) -> int:
    with urllib.request.urlopen(f"http://{url}/v2/models/add_one/stats", timeout=10) as reply:
        return int(json.loads(reply.read())["model_stats"][0]["inference_count"])


def render(results: list[dict]) -> str:
    def med(c: int, lib: str, key: str) -> float:
        return statistics.median(x[key] for x in results if (x["c"], x["lib"]) == (c, lib))

    lines = [
        "| add-one, perf_analyzer -i http (sync) | uvicorn infer/s | aiohttp infer/s | "
        "aiohttp/uvicorn | uvicorn p50 ms | aiohttp p50 ms | uvicorn CPU us/req | "
        "aiohttp CPU us/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCIES:
        u, a = med(c, "uvicorn", "thr"), med(c, "aiohttp", "thr")
        lines.append(
            f"| concurrency {c} | {u:,.0f} | {a:,.0f} | {a / u:.2f} | "
            f"{med(c, 'uvicorn', 'p50') / 1000:.3f} | {med(c, 'aiohttp', 'p50') / 1000:.3f} | "
            f"{med(c, 'uvicorn', 'cpu'):.0f} | {med(c, 'aiohttp', 'cpu'):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
