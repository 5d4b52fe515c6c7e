"""TLS and mutual TLS on both gRPC front ends and on /metrics, with real clients: tritonclient's
`ssl=True` options, Python's ssl module on a raw socket (ALPN, the certificate served), curl over
https, and plaintext clients knocking on a TLS port. Certificates are made in the test
(tests/pki.py); SIGHUP reloads them while an open connection keeps working."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pipeserve.cli import main
from tests import onnx_models as om
from tests.e2e.server import ServerProcess, serve_fails, wait_until
from tests.e2e.test_stream_and_aio import add_sub_inputs
from tests.pki import CA, Issued, serial_of

FRONT_ENDS = ("asyncio", "grpcio")
# The body of a unary ServerLive answer: gRPC prefix + ServerLiveResponse(live=true).
LIVE_ANSWER = b"\x00\x00\x00\x00\x02\x08\x01"


class PKI:
    def __init__(self, folder: Path) -> None:
        self.ca = CA(folder / "ca", "ca")
        self.server = self.ca.issue("server", server=True)
        self.client = self.ca.issue("client", server=False)
        # Another authority: its server certificate replaces the first one on reload, so a
        # client that trusts only `ca` could not reconnect; its client is a stranger.
        self.other_ca = CA(folder / "other", "other-ca")
        self.other_server = self.other_ca.issue("other-server", server=True)
        self.stranger = self.other_ca.issue("stranger", server=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    om.write_model(root, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    return root


@pytest.fixture
def live_files(tmp_path: Path, pki: PKI) -> Issued:
    """The server's certificate and key at paths the test may overwrite (reload)."""
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    return Issued(cert, key, pki.server.serial)


@pytest.fixture
def start() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def run(repo: Path, *args: str) -> ServerProcess:
        proc = ServerProcess(repo, *args)
        started.append(proc)
        return proc.wait_ready()

    yield run
    for proc in started:
        proc.stop()


def tls_flags(files: Issued, client_ca: Path | None = None) -> list[str]:
    out = []
    for endpoint in ("grpc", "metrics"):
        out += [f"--{endpoint}-tls-cert", str(files.cert), f"--{endpoint}-tls-key", str(files.key)]
        if client_ca is not None:
            out += [f"--{endpoint}-tls-client-ca", str(client_ca)]
    return out


def client_for(
    proc: ServerProcess, ca: Path, identity: Issued | None = None
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        proc.url,
        ssl=True,
        root_certificates=str(ca),
        private_key=str(identity.key) if identity else None,
        certificate_chain=str(identity.cert) if identity else None,
    )


def infer_ok(client: grpcclient.InferenceServerClient) -> None:
    inputs, expected = add_sub_inputs(2, seed=3)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)


def handshake(
    port: int, ca: Path, identity: Issued | None = None, alpn: tuple[str, ...] = ("h2",)
) -> tuple[int, str | None]:
    """A fresh TLS connection: (serial of the certificate the server presented, ALPN chosen)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(list(alpn))
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return serial_of(der), tls.selected_alpn_protocol()


def fetch_metrics(port: int, ca: Path, identity: Issued | None = None) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    url = f"https://localhost:{port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def lines_with(proc: ServerProcess, text: str) -> int:
    return sum(text in line for line in proc.lines)


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_tls_serves_tritonclient_and_raw_tls_clients(
    frontend: str, small_repo: Path, pki: PKI, start: Callable[..., ServerProcess]
) -> None:
    proc = start(small_repo, "--grpc-frontend", frontend, *tls_flags(pki.server))
    client = client_for(proc, pki.ca.cert)
    try:
        assert client.is_server_live() and client.is_model_ready("add_sub")
        infer_ok(client)
        # Another TLS client: the certificate the server presents, and ALPN h2.
        assert handshake(proc.grpc_port, pki.ca.cert) == (pki.server.serial, "h2")
        # /metrics over https (ALPN http/1.1), the same certificate.
        assert "nv_inference_count" in fetch_metrics(proc.metrics_port, pki.ca.cert)
        assert handshake(proc.metrics_port, pki.ca.cert, alpn=("http/1.1",)) == (
            pki.server.serial,
            "http/1.1",
        )
        infer_ok(client)
    finally:
        client.close()


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_plaintext_clients_on_a_tls_port_fail_cleanly(
    frontend: str, small_repo: Path, pki: PKI, start: Callable[..., ServerProcess]
) -> None:
    proc = start(small_repo, "--grpc-frontend", frontend, *tls_flags(pki.server))
    # tritonclient without ssl: a connection failure, not a hang or a wrong answer.
    plain = grpcclient.InferenceServerClient(proc.url)
    with pytest.raises(InferenceServerException) as refused:
        plain.is_server_live(client_timeout=10)
    assert refused.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    plain.close()
    # Raw bytes of HTTP/2 in the clear: the server closes (or answers a TLS alert, record type
    # 21) instead of waiting.
    with socket.create_connection(("127.0.0.1", proc.grpc_port), timeout=15) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)
        answer = raw.recv(64)
        assert answer == b"" or answer[0] == 21
    # Plain http on the https /metrics port.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10)
    # The server keeps serving TLS clients.
    client = client_for(proc, pki.ca.cert)
    try:
        infer_ok(client)
    finally:
        client.close()
    assert proc.proc.poll() is None
    assert "Traceback" not in proc.output()


@pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("PIPESERVE_TEST_REQUIRE_CURL"),
    reason="curl is not installed (CI installs it and sets PIPESERVE_TEST_REQUIRE_CURL)",
)
@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_curl_over_https_negotiates_h2(
    frontend: str, small_repo: Path, pki: PKI, start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """curl (libcurl + nghttp2, an HTTP/2 client independent of grpc-core) calls ServerLive."""
    proc = start(small_repo, "--grpc-frontend", frontend, *tls_flags(pki.server))
    request = tmp_path / "live.bin"
    request.write_bytes(b"\x00\x00\x00\x00\x00")  # one empty ServerLiveRequest
    body = tmp_path / "answer.bin"
    done = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--verbose", "--http2", "--cacert",
            str(pki.ca.cert), "-H", "content-type: application/grpc", "-H", "te: trailers",
            "--data-binary", f"@{request}", "--output", str(body),
            f"https://localhost:{proc.grpc_port}/inference.GRPCInferenceService/ServerLive",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ALPN: server accepted h2" in done.stderr or "ALPN, server accepted to use h2" in (
        done.stderr
    )
    assert body.read_bytes() == LIVE_ANSWER
    # Metrics over https with curl too.
    metrics = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(pki.ca.cert),
            f"https://localhost:{proc.metrics_port}/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert metrics.returncode == 0 and "nv_inference_count" in metrics.stdout, metrics.stderr


# ---- mutual TLS and reload ---------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_mutual_tls_and_reload_on_sighup(
    frontend: str,
    small_repo: Path,
    pki: PKI,
    live_files: Issued,
    start: Callable[..., ServerProcess],
) -> None:
    proc = start(
        small_repo, "--grpc-frontend", frontend, *tls_flags(live_files, client_ca=pki.ca.cert)
    )
    # A client with a certificate of the trusted CA is served; one without, or with a
    # certificate of another CA, is refused at the handshake.
    old = client_for(proc, pki.ca.cert, pki.client)
    try:
        infer_ok(old)
        for identity in (None, pki.stranger):
            refused = client_for(proc, pki.ca.cert, identity)
            with pytest.raises(InferenceServerException) as denied:
                refused.is_server_live(client_timeout=10)
            assert denied.value.status() == "StatusCode.UNAVAILABLE"
            refused.close()
        assert "nv_inference_count" in fetch_metrics(proc.metrics_port, pki.ca.cert, pki.client)
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            fetch_metrics(proc.metrics_port, pki.ca.cert)  # no client certificate
        assert handshake(proc.grpc_port, pki.ca.cert, pki.client) == (pki.server.serial, "h2")
        # The Docker HEALTHCHECK's probe speaks TLS when told to.
        tls_args = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert)]
        probe = ["health", "--address", proc.url, "--tls-server-name", "localhost"]
        assert main([*probe, *tls_args, "--tls-key", str(pki.client.key)]) == 0
        assert main([*probe, "--tls-ca", str(pki.ca.cert)]) == 1  # no client certificate
        assert main([*probe, *tls_args]) == 2  # a certificate without its key

        # Reload: the other CA's certificate. `old` trusts only `ca`, so it keeps working only
        # if its connection is the one it had (a new one would fail verification).
        shutil.copy(pki.other_server.cert, live_files.cert)
        shutil.copy(pki.other_server.key, live_files.key)
        proc.terminate(signal.SIGHUP)
        assert wait_until(lambda: lines_with(proc, "TLS certificate reloaded") == 2, 30)
        assert handshake(proc.grpc_port, pki.other_ca.cert, pki.client) == (
            pki.other_server.serial,
            "h2",
        )
        assert "nv_inference_count" in fetch_metrics(
            proc.metrics_port, pki.other_ca.cert, pki.client
        )
        for _ in range(3):
            infer_ok(old)
        fresh = client_for(proc, pki.other_ca.cert, pki.client)
        infer_ok(fresh)
        fresh.close()

        # A broken set of files is refused and the last good one keeps serving.
        live_files.key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
        proc.terminate(signal.SIGHUP)
        assert wait_until(lambda: lines_with(proc, "TLS reload failed") == 2, 30)
        assert handshake(proc.grpc_port, pki.other_ca.cert, pki.client)[0] == (
            pki.other_server.serial
        )
        infer_ok(old)
    finally:
        old.close()
    assert proc.proc.poll() is None


# ---- files that cannot serve: exit 2 naming the file ---------------------------------------------


def test_unusable_tls_files_fail_the_start_naming_the_file(
    small_repo: Path, pki: PKI, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases = [
        (
            ["--grpc-tls-cert", str(missing), "--grpc-tls-key", str(pki.server.key)],
            f"--grpc-tls-cert: cannot read '{missing}': No such file or directory",
        ),
        (
            ["--grpc-tls-cert", str(pki.server.cert), "--grpc-tls-key", str(pki.client.key)],
            f"--grpc-tls-key: '{pki.client.key}' is not the key of certificate '{pki.server.cert}'",
        ),
        (
            ["--grpc-tls-cert", str(not_pem), "--grpc-tls-key", str(pki.server.key)],
            f"--grpc-tls-cert: '{not_pem}' is not a PEM file",
        ),
        (
            [*tls_flags(pki.server)[:4], "--grpc-tls-client-ca", str(pki.server.key)],
            f"--grpc-tls-client-ca: no CA certificate in '{pki.server.key}'",
        ),
        (
            ["--metrics-tls-cert", str(pki.server.cert), "--metrics-tls-key", str(missing)],
            f"--metrics-tls-key: cannot read '{missing}'",
        ),
        (["--grpc-tls-cert", str(pki.server.cert)], "--grpc-tls-cert needs --grpc-tls-key"),
        (
            ["--grpc-tls-client-ca", str(pki.ca.cert)],
            "--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key",
        ),
    ]
    for args, message in cases:
        assert message in serve_fails(small_repo, *args)


# ---- HTTP/REST over https ------------------------------------------------------------------------


# geventhttpclient (under tritonclient.http) still calls the deprecated ssl.match_hostname.
@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")
def test_http_rest_over_https_with_mutual_tls(
    small_repo: Path, pki: PKI, live_files: Issued, start: Callable[..., ServerProcess]
) -> None:
    """tritonclient.http (geventhttpclient) with a client certificate; SIGHUP reaches it too."""
    proc = start(
        small_repo,
        "--http-tls-cert", str(live_files.cert),
        "--http-tls-key", str(live_files.key),
        "--http-tls-client-ca", str(pki.ca.cert),
    )  # fmt: skip

    def connect(ca: Path, identity: Issued | None) -> httpclient.InferenceServerClient:
        def context() -> ssl.SSLContext:
            made = ssl.create_default_context(cafile=str(ca))
            if identity is not None:
                made.load_cert_chain(identity.cert, identity.key)
            return made

        return httpclient.InferenceServerClient(
            f"localhost:{proc.http_port}", ssl=True, ssl_context_factory=context
        )

    client = connect(pki.ca.cert, pki.client)
    try:
        assert client.is_server_live()
        rng = np.random.default_rng(4)
        a, b = (rng.standard_normal((2, 16)).astype(np.float32) for _ in range(2))
        http_inputs = [httpclient.InferInput(n, [2, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        http_inputs[0].set_data_from_numpy(a)
        http_inputs[1].set_data_from_numpy(b)
        result = client.infer("add_sub", http_inputs)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    finally:
        client.close()
    stranger = connect(pki.ca.cert, None)
    # TLS 1.3: the client's handshake ends first, then the server refuses and closes.
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        stranger.is_server_live()
    stranger.close()
    assert handshake(proc.http_port, pki.ca.cert, pki.client, alpn=("http/1.1",)) == (
        pki.server.serial,
        "http/1.1",
    )
    shutil.copy(pki.other_server.cert, live_files.cert)
    shutil.copy(pki.other_server.key, live_files.key)
    proc.terminate(signal.SIGHUP)
    assert wait_until(lambda: lines_with(proc, "TLS certificate reloaded") == 1, 30)
    assert handshake(proc.http_port, pki.other_ca.cert, pki.client)[0] == pki.other_server.serial
