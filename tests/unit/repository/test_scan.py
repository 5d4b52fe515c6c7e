"""Repository scanning and change fingerprints."""

from __future__ import annotations

import os

from pipeserve.repository.scan import fingerprint, scan_repository, version_folders


def test_models_are_folders_and_versions_are_numeric(tmp_path):
    for path in (
        "a/1/model.onnx",
        "a/2/model.onnx",
        "a/x/model.onnx",
        "a/3/other.onnx",
        ".hidden/1/model.onnx",
        "b/config.pbtxt",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    (tmp_path / "file.txt").write_text("not a model")
    assert sorted(scan_repository(tmp_path)) == ["a", "b"]
    assert sorted(version_folders(tmp_path / "a", "model.onnx")) == [1, 2]
    assert sorted(version_folders(tmp_path / "a", "other.onnx")) == [3]
    assert scan_repository(tmp_path / "missing") == {}


def test_fingerprint_changes_with_content_and_new_files(tmp_path):
    model = tmp_path / "m" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"one")
    first = fingerprint(tmp_path / "m")
    assert fingerprint(tmp_path / "m") == first
    model.write_bytes(b"three")
    second = fingerprint(tmp_path / "m")
    assert second != first
    os.utime(model, ns=(1, 1))
    assert fingerprint(tmp_path / "m") != second
    third = fingerprint(tmp_path / "m")
    (tmp_path / "m" / "config.pbtxt").write_text("")
    assert fingerprint(tmp_path / "m") != third
