"""Start the real pipeserve server as a subprocess on free ports and read the bound ports back
from its log line (no bind-and-close port guessing)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Groups: grpc host, grpc port, metrics (HOST:PORT or off), http (HOST:PORT or off).
_LISTENING = re.compile(r"pipeserve listening: grpc=(\S+):(\d+) metrics=(\S+)(?: http=(\S+))?")
_READY = "pipeserve ready"


class ServerProcess:
    def __init__(self, repo: Path, *args: str, metrics: bool = True) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pipeserve",
            "serve",
            "--model-repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--exit-timeout-secs",
            "10",
            *args,
        ]
        if not metrics:
            cmd.append("--no-metrics")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._ready = threading.Event()
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m:
                self.grpc_port = int(m.group(2))
                if m.group(3) != "off":
                    self.metrics_port = int(m.group(3).rsplit(":", 1)[1])
                if m.group(4) not in (None, "off"):
                    self.http_port = int(m.group(4).rsplit(":", 1)[1])
                self._listening.set()
            if _READY in line:
                self._ready.set()
        self._listening.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("pipeserve did not become ready:\n" + self.output())
        return self

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """HOST:PORT of the HTTP/REST endpoint, as tritonclient.http takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return "\n".join(self.lines)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        self.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def serve_fails(repo: Path, *args: str, environ: dict[str, str] | None = None) -> str:
    """Run `python -m pipeserve serve` as a user would, expecting it to refuse to start (before
    it binds a port): exit 2, no traceback. Returns its stderr. PIPESERVE_* variables come only
    from `environ`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESERVE_")}
    env.update(environ or {})
    done = subprocess.run(
        [sys.executable, "-m", "pipeserve", "serve", "--model-repository", str(repo), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr
