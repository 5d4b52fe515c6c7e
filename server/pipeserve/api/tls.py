"""TLS for every listening endpoint: one place that reads certificate files, builds the server
SSLContext (TLS 1.2 minimum, ALPN) and reloads them.

An endpoint's `ServerTLS` hands out
- `context`: an `ssl.SSLContext` for asyncio servers (the own gRPC transport, /metrics, HTTP).
  It is built once and never replaced; its SNI callback switches each new handshake to the newest
  loaded context, so a reload reaches new connections while established ones keep the session
  they negotiated (OpenSSL calls that callback with or without SNI in the ClientHello);
- `grpc_credentials()`: grpc.aio credentials whose certificate-config fetcher returns the newest
  files, which grpc-core asks for before each new handshake.

`reload()` (SIGHUP, wired in app.py) reads the files again; when they do not form a valid
configuration it logs why and keeps serving the previous one. Whether client certificates are
required is fixed at start (it decides the verify mode of the context asyncio was given).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from pipeserve.settings import SettingsError

log = logging.getLogger(__name__)

# TLS 1.0 and 1.1 are deprecated (RFC 8996); gRPC clients speak 1.2 and 1.3.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# A connection that has not finished its handshake by then is closed (asyncio's default is 60 s).
HANDSHAKE_TIMEOUT_S = 10.0

ALPN_GRPC = ("h2",)
ALPN_HTTP1 = ("http/1.1",)


class TLSConfigError(SettingsError):
    """A certificate, key or CA file that cannot serve: the message names the flag and the file."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM files of one endpoint. `flag` is the flag prefix errors name (`grpc-tls`)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    flag: str = "tls"


@dataclass(frozen=True, slots=True)
class _Loaded:
    context: ssl.SSLContext
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"--{flag}: cannot read '{path}': {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"--{flag}: '{path}' is not a PEM file (no '-----BEGIN' line)")
    return data


def _load(files: TLSFiles, alpn: Sequence[str]) -> _Loaded:
    """Read and check every file; the context is complete (certificate, key, CAs, ALPN)."""
    cert = _read(files.cert, f"{files.flag}-cert")
    key = _read(files.key, f"{files.flag}-key")
    client_ca = (
        None if files.client_ca is None else _read(files.client_ca, f"{files.flag}-client-ca")
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(list(alpn))
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TLSConfigError(
                f"--{files.flag}-key: '{files.key}' is not the key of certificate '{files.cert}'"
            ) from None
        raise TLSConfigError(
            f"--{files.flag}-cert/--{files.flag}-key: cannot load certificate '{files.cert}' "
            f"with key '{files.key}': {exc.reason or exc}"
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("latin-1"))  # type: ignore[union-attr]
        except (ssl.SSLError, ValueError) as exc:
            raise TLSConfigError(
                f"--{files.flag}-client-ca: no CA certificate in '{files.client_ca}': {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return _Loaded(context, cert, key, client_ca)


class ServerTLS:
    """The live TLS configuration of one endpoint (see the module docstring)."""

    def __init__(self, files: TLSFiles, alpn: Sequence[str] = ALPN_GRPC) -> None:
        self.files = files
        self._alpn = tuple(alpn)
        self._lock = threading.Lock()  # the grpc fetcher runs on grpc-core's threads
        self._current = _load(files, self._alpn)
        self._grpc_pending: _Loaded | None = None
        # The context asyncio keeps: built like the others, so its verify mode and ALPN hold
        # for the handshake; the SNI callback then switches to the newest certificates.
        self.context = _load(files, self._alpn).context
        self.context.sni_callback = self._pick

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def _pick(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current.context
        return None

    def reload(self) -> bool:
        """Read the files again; True when the new ones are in use. A broken set is logged and
        the previous one keeps serving."""
        try:
            loaded = _load(self.files, self._alpn)
        except TLSConfigError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        with self._lock:
            self._current = loaded
            self._grpc_pending = loaded
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpc.aio credentials that follow `reload()`."""
        current = self._current
        return grpc.dynamic_ssl_server_credentials(
            _grpc_config(current),
            self.fetch_grpc_config,
            require_client_authentication=self.mutual,
        )

    def fetch_grpc_config(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc-core's certificate-config fetcher, called before each new handshake: the files
        of the last reload once, else None (keep the configuration it has)."""
        with self._lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return None if pending is None else _grpc_config(pending)


def _grpc_config(loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(loaded.key, loaded.cert)], root_certificates=loaded.client_ca
    )
