"""open_session / open_stage_session: identical outputs, integrity errors, mapping lifetime."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pipeserve.errors import ModelLoadError
from pipeserve.weights.checks import ByteRange
from pipeserve.weights.mapping import open_session, open_stage_session, select_graph
from pipeserve.weights.pack import pack_model
from pipeserve.weights.pack_index import INDEX_NAME
from pipeserve.weights.prefetch import merged
from tests.unit.weights_models import sample_input, save_external, save_inline, transformer_like

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source graph with ONNX external data, folder it was packed into)."""
    root = tmp_path_factory.mktemp("weights")
    src = save_external(transformer_like(), root / "src" / "model.onnx")
    pack_model(src, root / "packed")
    return src, root / "packed"


def copy_pack(packed_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in packed_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def plain(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=CPU).run(None, {"x": x})[0]  # type: ignore[no-any-return]


def maps_of(path: Path) -> list[str]:
    text = Path("/proc/self/maps").read_text()
    return [line for line in text.splitlines() if str(path) in line]


def first_layer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Stage 1 of a two-stage cut: x -> l0_out, with only the initializers it uses (copies of
    the TensorProtos, so external references are kept as they are)."""
    nodes = [n for n in model.graph.node if all(o.startswith("l0_") for o in n.output)]
    used = {name for n in nodes for name in n.input}
    graph = helper.make_graph(
        nodes,
        "stage0",
        [model.graph.input[0]],
        [helper.make_tensor_value_info("l0_out", TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used],
    )
    stage = helper.make_model(graph, opset_imports=model.opset_import)
    stage.ir_version = model.ir_version
    return stage


def test_inline_model_gets_a_plain_session(tmp_path: Path) -> None:
    src = save_inline(transformer_like(), tmp_path / "model.onnx")
    session, weights = open_session(src, CPU, ort.SessionOptions())
    assert weights is None
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))


def test_unpacked_external_data_is_mapped_and_identical(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "model.onnx")
    session, weights = open_session(src, CPU, ort.SessionOptions())
    assert weights is not None
    assert weights.paths == ((tmp_path / "model.onnx.data").resolve(),)
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    # A typed, read-only view on the mapping holds the initializer (no copy was made to get it).
    w1 = weights.array("l0_w1")
    assert w1.dtype == np.float32 and w1.shape == (64, 256) and not w1.flags.writeable
    assert not w1.flags.owndata
    original = next(t for t in onnx.load(str(src)).graph.initializer if t.name == "l0_w1")
    assert np.array_equal(w1, onnx.numpy_helper.to_array(original))
    assert weights.array("half").dtype == np.float16
    del session, w1
    weights.close()


def test_packed_model_uses_the_pack_time_cpu_graph(packed: tuple[Path, Path]) -> None:
    src, out = packed
    session, weights = open_session(out / "model.onnx", CPU, ort.SessionOptions())
    assert weights is not None
    assert weights.graph_path == out / "model.cpu.onnx"
    # The session reads the pre-packed blobs too: they are among the ranges mapped/prefetched.
    index = json.loads((out / INDEX_NAME).read_text())
    blob_ranges = {(b["offset"], b["length"]) for b in index["optimized"]["blobs"]}
    assert blob_ranges and blob_ranges <= {(r.offset, r.length) for r in weights.ranges}
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    del session
    weights.close()


@pytest.mark.parametrize("prefetch", [True, False, "none", "willneed", "read"])
@pytest.mark.parametrize("placement", ["ort", "initializers"])
def test_every_prefetch_and_placement_gives_identical_outputs(
    packed: tuple[Path, Path], prefetch: object, placement: str
) -> None:
    src, out = packed
    session, weights = open_session(
        out / "model.onnx", CPU, ort.SessionOptions(), prefetch=prefetch, placement=placement
    )  # type: ignore[arg-type]
    assert weights is not None and weights.placement == placement
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    del session
    weights.close()


def test_bad_prefetch_value_is_refused(packed: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="prefetch must be"):
        open_session(packed[1] / "model.onnx", CPU, ort.SessionOptions(), prefetch="eager")  # type: ignore[arg-type]


def test_cuda_listed_without_a_usable_gpu_falls_back_to_onnxruntime_loading(
    packed: tuple[Path, Path],
) -> None:
    """The GPU upload path is guarded: with no usable CUDA device the weights are left to
    onnxruntime. (The upload itself needs a GPU and is not exercised here.)"""
    src, out = packed
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    session, weights = open_session(out / "model.onnx", providers, ort.SessionOptions())
    assert weights is not None
    if "CUDAExecutionProvider" in session.get_providers():
        pytest.skip("a GPU is present: this test covers the no-GPU fallback")
    assert weights.placement == "ort"
    assert weights.graph_path == out / "model.onnx"  # the CPU graph is only for CPU sessions
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    del session
    weights.close()


def test_truncated_weight_file_names_the_tensor_and_file(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    data = out / "weights.bin"
    index = json.loads((out / INDEX_NAME).read_text())
    last = max(index["tensors"], key=lambda t: t["offset"])
    with open(data, "r+b") as f:
        f.truncate(last["offset"] + 10)
    with pytest.raises(ModelLoadError) as err:
        open_session(out / "model.onnx", CPU, ort.SessionOptions(), prepack=False)
    message = str(err.value)
    assert f"weight file '{data}' is {last['offset'] + 10} bytes, the index says" in message
    assert f"initializer '{last['name']}' lies beyond its end" in message


def test_truncated_unpacked_external_file_names_the_tensor(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "model.onnx")
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:70000])
    with pytest.raises(
        ModelLoadError,
        match=r"initializer 'l0_w2': needs bytes up to \d+ of "
        r"'.*model\.onnx\.data', which has only 70000",
    ):
        open_session(src, CPU, ort.SessionOptions())


def test_missing_weight_file_is_a_clear_error(packed: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    (out / "weights.bin").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"weight file '.*weights\.bin' is missing \(needed by "
        r"initializer 'l0_w1'\)",
    ):
        open_session(out / "model.onnx", CPU, ort.SessionOptions())


def test_missing_unpacked_external_file_is_a_clear_error(tmp_path: Path) -> None:
    src = save_external(transformer_like(), tmp_path / "model.onnx", one_file=False)
    (tmp_path / "l1_w2").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"initializer 'l1_w2': weight file '.*l1_w2' is "
        r"missing",
    ):
        open_session(src, CPU, ort.SessionOptions())


def test_index_that_does_not_match_the_graph_names_the_tensor(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    index = json.loads((out / INDEX_NAME).read_text())
    entry = next(t for t in index["tensors"] if t["name"] == "l0_w2")
    entry["offset"] += 65536
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError,
        match=r"initializer 'l0_w2': the graph puts it at offset "
        r"\d+ length 65536 of '.*weights\.bin', the index "
        r"says offset \d+ length 65536",
    ):
        open_session(out / "model.onnx", CPU, ort.SessionOptions(), prepack=False)


def test_malformed_index_is_a_clear_error(packed: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    (out / INDEX_NAME).write_text('{"format": "pipeserve-weights", "version": 1}')
    with pytest.raises(ModelLoadError, match=r"weight index '.*' is malformed: 'weight_file'"):
        open_session(out / "model.onnx", CPU, ort.SessionOptions())


def test_corrupted_bytes_are_caught_by_checksum_verification(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    index = json.loads((out / INDEX_NAME).read_text())
    entry = next(t for t in index["tensors"] if t["name"] == "l1_w1")
    with open(out / "weights.bin", "r+b") as f:
        f.seek(entry["offset"] + 100)
        f.write(b"\xff\xff\xff\xff")
    # Sizes are all that is checked by default (cheap); the full pass is asked for.
    session, weights = open_session(out / "model.onnx", CPU, ort.SessionOptions(), prepack=False)
    del session
    assert weights is not None
    weights.close()
    with pytest.raises(
        ModelLoadError,
        match=r"initializer 'l1_w1': checksum of bytes "
        r"\d+\.\.\d+ of '.*weights\.bin' is [0-9a-f]{8}, the "
        r"index says [0-9a-f]{8} \(file corrupted\)",
    ):
        open_session(
            out / "model.onnx", CPU, ort.SessionOptions(), prepack=False, verify_checksums=True
        )


def test_graph_from_another_machine_falls_back_to_the_portable_graph(
    packed: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, _ = packed
    out = copy_pack(packed[1], tmp_path / "p")
    index = json.loads((out / INDEX_NAME).read_text())
    index["optimized"]["fingerprint"]["cpu_flags_sha256"] = "elsewhere"
    (out / INDEX_NAME).write_text(json.dumps(index))
    assert select_graph(out / "model.onnx", CPU) == out / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="pipeserve.weights.mapping"):
        session, weights = open_session(out / "model.cpu.onnx", CPU, ort.SessionOptions())
    assert "optimised on another machine" in caplog.text
    assert weights is not None and weights.graph_path == out / "model.onnx"
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    del session
    weights.close()


def test_close_releases_the_mapping_and_the_file(packed: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    data = out / "weights.bin"
    session, weights = open_session(
        out / "model.onnx", CPU, ort.SessionOptions(), placement="initializers"
    )
    assert weights is not None
    session.run(None, {"x": sample_input()})
    assert maps_of(data)
    with pytest.raises(RuntimeError, match="still use its memory"):
        weights.close()  # onnxruntime borrows the mapping: refusing beats a crash
    del session
    gc.collect()
    weights.close()
    assert weights.closed
    data.unlink()
    # Neither our mapping nor onnxruntime's remains, so the deleted file's pages are freed.
    assert maps_of(data) == []


def test_close_after_an_onnxruntime_mapped_session(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    out = copy_pack(packed[1], tmp_path / "p")
    session, weights = open_session(out / "model.onnx", CPU, ort.SessionOptions())
    assert weights is not None
    session.run(None, {"x": sample_input()})
    del session
    gc.collect()
    weights.close()
    (out / "weights.bin").unlink()
    assert maps_of(out / "weights.bin") == []


def test_stage_session_maps_only_its_own_weights(packed: tuple[Path, Path]) -> None:
    """A stage cut from the graph (loaded without weights) keeps its external references; only
    the tensors it uses are checked, mapped and prefetched."""
    src, out = packed
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stage = first_layer(graph)
    session, weights = open_stage_session(stage, out, CPU, ort.SessionOptions())
    assert weights is not None
    stage_names = {t.name for t in stage.graph.initializer if t.data_location == 1}
    assert stage_names == {"l0_w1", "l0_b1", "l0_w2"}
    offsets = {(r.offset, r.length) for r in weights.ranges}
    index = json.loads((out / INDEX_NAME).read_text())
    wanted = {(t["offset"], t["length"]) for t in index["tensors"] if t["name"] in stage_names}
    assert offsets == wanted
    # The same cut of the original model, weights inline, run by plain onnxruntime.
    x = sample_input()
    cut = first_layer(onnx.load(str(src)))
    want = ort.InferenceSession(cut.SerializeToString(), providers=CPU).run(None, {"x": x})[0]
    assert np.array_equal(session.run(None, {"x": x})[0], want)
    del session
    weights.close()


def test_stage_cut_from_the_cpu_graph_keeps_its_prepacked_blobs(packed: tuple[Path, Path]) -> None:
    src, out = packed
    graph = onnx.load(str(out / "model.cpu.onnx"), load_external_data=False)
    session, weights = open_stage_session(graph, out, CPU, ort.SessionOptions())
    assert weights is not None
    index = json.loads((out / INDEX_NAME).read_text())
    blob_ranges = {(b["offset"], b["length"]) for b in index["optimized"]["blobs"]}
    assert blob_ranges <= {(r.offset, r.length) for r in weights.ranges}
    x = sample_input()
    assert np.array_equal(session.run(None, {"x": x})[0], plain(src, x))
    del session
    weights.close()


def test_prefetch_merges_neighbouring_ranges_per_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ranges = [
        ByteRange(a, 200_000, 10),
        ByteRange(a, 0, 100),
        ByteRange(a, 65536 + 50, 10),
        ByteRange(b, 0, 10),
        ByteRange(a, 5, 0),
    ]
    assert merged(ranges) == [
        ByteRange(a, 0, 65596),
        ByteRange(a, 200_000, 10),
        ByteRange(b, 0, 10),
    ]
