"""pipeserve.api.tls: files checked with errors naming them; reload swaps or keeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeserve.api.tls import ServerTLS, TLSConfigError, TLSFiles
from tests.pki import CA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("pki"), "ca")


def test_a_key_of_another_certificate_is_named(ca: CA) -> None:
    a, b = ca.issue("a", server=True), ca.issue("b", server=True)
    with pytest.raises(TLSConfigError, match=f"--grpc-tls-key: '{b.key}' is not the key of"):
        ServerTLS(TLSFiles(a.cert, b.key, None, "grpc-tls"))


def test_reload_swaps_good_files_and_keeps_serving_on_broken_ones(
    ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ca.issue("first", server=True), ca.issue("second", server=True)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    tls = ServerTLS(TLSFiles(cert, key, ca.cert, "grpc-tls"))
    assert tls.mutual
    # grpc.aio's fetcher: nothing new until a reload, then the new files once.
    assert tls.fetch_grpc_config() is None
    shutil.copy(second.cert, cert)
    shutil.copy(second.key, key)
    assert tls.reload()
    assert tls.fetch_grpc_config() is not None
    assert tls.fetch_grpc_config() is None
    key.write_text("garbage")
    assert not tls.reload()
    assert "TLS reload failed, still serving the previous certificate" in caplog.text
    assert f"'{key}' is not a PEM file" in caplog.text
    assert tls.fetch_grpc_config() is None
