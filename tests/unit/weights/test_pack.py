"""pipeserve pack: layout, index, identical outputs, safe re-packing, the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeserve.cli.pack import add_pack_parser
from pipeserve.errors import ModelLoadError
from pipeserve.weights.external_data import external_refs, iter_initializers
from pipeserve.weights.mapping import open_session
from pipeserve.weights.pack import pack_model
from pipeserve.weights.pack_index import INDEX_NAME, read_index
from tests.unit.weights_models import (
    sample_input,
    save_external,
    save_inline,
    transformer_like,
)

CPU = ["CPUExecutionProvider"]


def run_plain(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=CPU)
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def run_mapped(path: Path, x: np.ndarray, **kwargs: object) -> np.ndarray:
    session, weights = open_session(path, CPU, ort.SessionOptions(), **kwargs)  # type: ignore[arg-type]
    try:
        return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]
    finally:
        del session
        if weights is not None:
            weights.close()


@pytest.mark.parametrize("layout", ["external_one_file", "external_per_tensor", "inline"])
def test_packed_outputs_equal_plain_onnxruntime_on_the_original(
    tmp_path: Path, layout: str
) -> None:
    src = tmp_path / "src" / "model.onnx"
    if layout == "inline":
        save_inline(transformer_like(), src)
    else:
        save_external(transformer_like(), src, one_file=layout == "external_one_file")
    out = tmp_path / "packed"
    report = pack_model(src, out)
    x = sample_input()
    expected = run_plain(src, x)

    assert report.optimized_graph == out / "model.cpu.onnx"
    assert report.prepacked_blobs > 0
    # Through pipeserve (pack-time CPU graph), the portable graph, and plain onnxruntime on both.
    assert np.array_equal(run_mapped(out / "model.onnx", x), expected)
    assert np.array_equal(run_mapped(out / "model.onnx", x, prepack=False), expected)
    assert np.array_equal(run_plain(out / "model.onnx", x), expected)
    assert np.array_equal(run_plain(out / "model.cpu.onnx", x), expected)


def test_layout_is_aligned_indexed_and_deduplicated(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    out = tmp_path / "packed"
    report = pack_model(src, out)
    index = read_index(out)
    assert index is not None
    data = (out / "weights.bin").read_bytes()
    assert index.weight_file_size == len(data) == report.file_bytes

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    refs = {r.name: r for r in external_refs(graph)}
    entries = {e.name: e for e in index.tensors}
    assert set(refs) == set(entries)
    assert "then_w" in refs and "else_w" in refs  # subgraph initializers are packed too
    for name, entry in entries.items():
        assert entry.offset % 65536 == 0, name
        assert (refs[name].offset, refs[name].length) == (entry.offset, entry.length)
        assert zlib.crc32(data[entry.offset : entry.offset + entry.length]) == entry.crc32
    assert entries["tie_a"].offset == entries["tie_b"].offset
    assert entries["half"].dtype == "FLOAT16"
    assert entries["l0_w1"].shape == (64, 256)
    # Biases (256 bytes) stay in the graph; the 1 KiB threshold decides.
    inline = {t.name for t in iter_initializers(graph) if t.data_location != 1}
    assert {"l0_b", "l0_g"} <= inline

    assert index.optimized is not None
    for blob in index.optimized.blobs:
        assert blob.offset % 65536 == 0
        assert zlib.crc32(data[blob.offset : blob.offset + blob.length]) == blob.crc32
    # Tensors the optimiser left unchanged are shared with the portable graph, not stored twice.
    portable_offsets = {e.offset for e in index.tensors}
    assert any(e.offset in portable_offsets for e in index.optimized.tensors)


def test_no_optimize_writes_one_copy_of_the_weights(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    out = tmp_path / "packed"
    report = pack_model(src, out, optimize=False)
    index = read_index(out)
    assert index is not None and index.optimized is None
    assert report.optimized_graph is None and not (out / "model.cpu.onnx").exists()
    last = max(index.tensors, key=lambda e: e.offset)
    assert report.file_bytes == last.offset + last.length
    x = sample_input()
    assert np.array_equal(run_mapped(out / "model.onnx", x), run_plain(src, x))


def test_missing_source_weight_file_names_the_tensor_and_file(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    (tmp_path / "src" / "model.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"initializer 'l0_w1'.*model\.onnx\.data"):
        pack_model(src, tmp_path / "packed")
    assert not (tmp_path / "packed" / INDEX_NAME).exists()


def test_truncated_source_weight_file_names_the_tensor(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    data = tmp_path / "src" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"initializer 'l0_w1': needs bytes 0\.\.65536"):
        pack_model(src, tmp_path / "packed")


def test_bad_alignment_is_refused(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    with pytest.raises(ModelLoadError, match="alignment 1000 must be a power of two"):
        pack_model(src, tmp_path / "packed", alignment=1000)


def test_repacking_leaves_running_sessions_on_their_old_weights(tmp_path: Path) -> None:
    """Files are replaced (new inodes), never overwritten: a session created before a re-pack
    keeps computing with the weights it was loaded with, while requests run."""
    out = tmp_path / "packed"
    src_a = save_external(transformer_like(seed=0), tmp_path / "a" / "model.onnx")
    src_b = save_external(transformer_like(seed=1), tmp_path / "b" / "model.onnx")
    x = sample_input()
    expected_a, expected_b = run_plain(src_a, x), run_plain(src_b, x)
    pack_model(src_a, out)
    session, weights = open_session(out / "model.onnx", CPU, ort.SessionOptions())
    results: list[bool] = []
    stop = threading.Event()
    run = session.run

    def serve() -> None:
        while not stop.is_set():
            results.append(bool(np.array_equal(run(None, {"x": x})[0], expected_a)))

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        pack_model(src_b, out)
        assert np.array_equal(run_mapped(out / "model.onnx", x), expected_b)
    finally:
        stop.set()
        worker.join()
    assert results and all(results)
    assert np.array_equal(session.run(None, {"x": x})[0], expected_a)
    del session
    assert weights is not None
    weights.close()


def test_cli_packs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    parser = argparse.ArgumentParser(prog="pipeserve")
    add_pack_parser(parser.add_subparsers())
    args = parser.parse_args(["pack", str(src), str(tmp_path / "out"), "--no-optimize"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "model.onnx:" in out and "weights.bin:" in out
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["format"] == "pipeserve-weights" and index["optimized"] is None


def test_cli_reports_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="pipeserve")
    add_pack_parser(parser.add_subparsers())
    args = parser.parse_args(["pack", str(tmp_path / "nope.onnx"), str(tmp_path / "out")])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("pipeserve pack: error: cannot read ONNX model") and "nope.onnx" in err


def test_cli_progress_on_a_pipe_is_plain_lines_on_stderr(tmp_path: Path) -> None:
    # A subprocess, so stderr really is a pipe (not a terminal): plain lines, no bar.
    src = save_external(transformer_like(), tmp_path / "src" / "model.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "pipeserve", "pack", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    phases = [line.split(": ")[1] for line in result.stderr.splitlines()]
    assert phases == ["weights", "onnxruntime CPU optimisation", "optimised weights"]
    assert "\r" not in result.stderr
    assert all(": done (" in line for line in result.stderr.splitlines())
    assert result.stdout.startswith("packed into ")


def test_progress_advances_inside_a_big_tensor(tmp_path: Path) -> None:
    # One 40 MiB weight: the weights phase must report more than once while it is read, and end
    # at exactly the model's weight bytes.
    w = np.ones((1024, 10240), dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 1024])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 10240])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    src = save_external(model, tmp_path / "src" / "model.onnx")
    heard: list[tuple[str, int, int, str]] = []
    pack_model(src, tmp_path / "out", optimize=False, on_progress=lambda *a: heard.append(a))
    weights = [(done, total) for phase, done, total, unit in heard if phase == "weights"]
    assert len(weights) >= 3, weights
    assert all(total == w.nbytes for _, total in weights)
    assert [done for done, _ in weights] == sorted(done for done, _ in weights)
    assert weights[-1][0] == w.nbytes
