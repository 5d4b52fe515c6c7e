"""`pipeserve pack MODEL OUT_DIR`: rewrite an ONNX model into the layout pipeserve maps best.

The source may keep its weights inline or in ONNX external data (any file names, any alignment).
The packer streams one tensor at a time from the source's mapping into `weights.bin`, so a model
of any size packs in the memory of its largest tensor (inline models are held whole by protobuf
anyway, and are below 2 GB by definition).

With `optimize` (the default) onnxruntime optimises the packed graph once, here, for the CPU at
level ALL, with its pre-packed MatMul weights serialised
(`session.save_external_prepacked_constant_initializers`). Those blobs are appended to the same
`weights.bin` and referenced from `model.cpu.onnx`; at load onnxruntime maps them from the file
instead of keeping a private packed copy per session. See pack_index.py for the folder layout.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeserve.errors import ModelLoadError
from pipeserve.progress import ProgressCallback
from pipeserve.weights.external_data import (
    Prepacked,
    PrepackedBlob,
    external_ref,
    is_external,
    iter_graphs,
    iter_initializers,
    set_external,
)
from pipeserve.weights.layout import DEFAULT_ALIGNMENT, DEFAULT_INLINE_BELOW
from pipeserve.weights.pack_index import (
    BlobEntry,
    OptimizedGraph,
    PackIndex,
    TensorEntry,
    cpu_fingerprint,
    crc32_of,
    write_index,
)

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
OPTIMIZED_GRAPH_NAME = "model.cpu.onnx"
WEIGHT_FILE_NAME = "weights.bin"


@dataclass(frozen=True, slots=True)
class PackReport:
    out_dir: Path
    graph: Path
    optimized_graph: Path | None
    weight_file: Path
    tensors: int  # external tensors of the portable graph
    inline_tensors: int  # initializers left in the graph (smaller than inline_below)
    weight_bytes: int  # bytes of the portable graph's external tensors
    prepacked_blobs: int
    prepacked_bytes: int
    file_bytes: int  # logical size of weights.bin (padding is holes, not disk)
    seconds: float

    def summary(self) -> str:
        lines = [
            f"packed into {self.out_dir} in {self.seconds:.1f} s",
            f"  {self.graph.name}: {self.tensors} external tensors, {self.weight_bytes} bytes; "
            f"{self.inline_tensors} small initializers kept inline",
        ]
        if self.optimized_graph is not None:
            lines.append(
                f"  {self.optimized_graph.name}: onnxruntime CPU graph, {self.prepacked_blobs} "
                f"pre-packed weight blobs, {self.prepacked_bytes} bytes"
            )
        lines.append(f"  {self.weight_file.name}: {self.file_bytes} bytes")
        return "\n".join(lines)


class _SourceData:
    """Maps external-data files on first use; checks every range against them."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self._folder = folder
        self._stack = stack
        self._maps: dict[str, mmap.mmap | None] = {}

    def view(self, tensor: TensorProto) -> memoryview:
        ref = external_ref(tensor)
        return self.range(ref.location, ref.offset, ref.length, tensor.name)

    def range(self, location: str, offset: int, length: int, tensor: str) -> memoryview:
        path = self._folder / location
        if location not in self._maps:
            try:
                self._maps[location] = _map_readonly(path, self._stack)
            except FileNotFoundError:
                raise ModelLoadError(
                    f"initializer '{tensor}': external-data file '{path}' does not exist"
                ) from None
        mapped = self._maps[location]
        size = len(mapped) if mapped is not None else 0
        if offset + length > size:
            raise ModelLoadError(
                f"initializer '{tensor}': needs bytes {offset}..{offset + length} of '{path}', "
                f"which has only {size}"
            )
        if mapped is None or length == 0:
            return memoryview(b"")
        return memoryview(mapped)[offset : offset + length]


def _map_readonly(path: Path, stack: ExitStack) -> mmap.mmap | None:
    """A read-only mapping closed with `stack`; None for an empty file (mmap refuses those)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    stack.callback(mapped.close)
    return mapped


def _raw_bytes(tensor: TensorProto) -> bytes:
    """Little-endian raw bytes of an inline tensor, whichever field holds them."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _stored_bytes(tensor: TensorProto) -> int:
    """Bytes of an initializer's data without reading it (progress totals only)."""
    if tensor.data_type == TensorProto.STRING:
        return 0
    if is_external(tensor):
        return external_ref(tensor).length
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


class _WeightWriter:
    """Appends tensors to weights.bin at aligned offsets; identical bytes are stored once."""

    def __init__(self, file: BinaryIO, alignment: int, start: int = 0) -> None:
        self._file = file
        self._alignment = alignment
        self.end = start
        # (length, crc32) -> offsets already written with those bytes, and a view of them.
        self._seen: dict[tuple[int, int], list[tuple[int, memoryview]]] = {}

    def forget(self) -> None:
        """Drop the views kept for de-duplication: mappings cannot close while views exist."""
        self._seen.clear()

    def remember(self, offset: int, view: memoryview, crc: int) -> None:
        self._seen.setdefault((len(view), crc), []).append((offset, view))

    def write(self, view: memoryview, crc: int) -> int:
        for offset, other in self._seen.get((len(view), crc), ()):
            if np.array_equal(np.frombuffer(view, np.uint8), np.frombuffer(other, np.uint8)):
                return offset
        offset = -(-self.end // self._alignment) * self._alignment
        # Seeking past the end leaves a hole: the padding costs no disk and is never read.
        self._file.seek(offset)
        self._file.write(view)
        self.end = offset + len(view)
        self.remember(offset, view, crc)
        return offset


def _entry(tensor: TensorProto, offset: int, length: int, crc: int) -> TensorEntry:
    return TensorEntry(
        tensor.name,
        offset,
        length,
        TensorProto.DataType.Name(tensor.data_type),
        tuple(int(d) for d in tensor.dims),
        crc,
    )


def _inline_attribute_tensors(model: onnx.ModelProto, source: _SourceData) -> None:
    """Constant-node and sparse tensors with external data are brought into the graph: they are
    small in practice, and only initializers are mapped."""

    def fix(tensor: TensorProto) -> None:
        if is_external(tensor):
            data = bytes(source.view(tensor))
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = data

    for graph in iter_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            fix(sparse.values)
            fix(sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    fix(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        fix(t)
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    fix(attr.sparse_tensor.values)
                    fix(attr.sparse_tensor.indices)


def _write_portable(
    model: onnx.ModelProto,
    source: _SourceData,
    writer: _WeightWriter,
    inline_below: int,
    on_progress: ProgressCallback | None = None,
) -> tuple[list[TensorEntry], int]:
    """Move every initializer of `inline_below` bytes or more into weights.bin; bring smaller
    external ones inline. Returns the index entries and the count left inline."""
    entries: list[TensorEntry] = []
    inline = 0
    total = sum(_stored_bytes(t) for t in iter_initializers(model))
    done = 0

    def report(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if on_progress is not None:
            on_progress("weights", min(done, total), total, "B")

    for tensor in iter_initializers(model):
        if tensor.data_type == TensorProto.STRING:
            inline += 1  # strings have no raw layout; they stay in the graph
            continue
        external = is_external(tensor)
        view = source.view(tensor) if external else memoryview(_raw_bytes(tensor))
        if len(view) < inline_below:
            if external:
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = bytes(view)
            inline += 1
            report(len(view))
            continue
        # Reading the source (the checksum's pass) is the slow part of a cold multi-GB tensor:
        # progress advances per chunk of it, not per tensor.
        crc = crc32_of(view, on_chunk=report)
        offset = writer.write(view, crc)
        set_external(tensor, WEIGHT_FILE_NAME, offset, len(view))
        entries.append(_entry(tensor, offset, len(view), crc))
    return entries, inline


def _optimize_with_ort(graph_path: Path, out_graph: Path, inline_below: int) -> None:
    """Let onnxruntime optimise `graph_path` for the CPU and save it with external initializers
    and its pre-packed weights (written beside `out_graph` as `<name>.data`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out_graph)
    options.log_severity_level = 3  # level ALL warns that the result is machine specific: known
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", out_graph.name + ".data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(inline_below)
    )
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    try:
        ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"onnxruntime could not optimise '{graph_path}': {exc}") from None


def _relayout_optimized(
    ort_graph: Path,
    writer: _WeightWriter,
    stack: ExitStack,
    on_progress: ProgressCallback | None = None,
) -> tuple[onnx.ModelProto, list[TensorEntry], list[BlobEntry]]:
    """Move the tensors and pre-packed blobs onnxruntime wrote into weights.bin (tensors equal to
    portable ones are shared) and point the optimised graph at them."""
    model = onnx.load(str(ort_graph), load_external_data=False)
    source = _SourceData(ort_graph.parent, stack)
    tensors: list[TensorEntry] = []
    blobs: list[BlobEntry] = []
    external = [t for t in iter_initializers(model) if is_external(t)]
    for done, tensor in enumerate(external, start=1):
        if on_progress is not None:
            on_progress("optimised weights", done, len(external), "tensor")
        ref = external_ref(tensor)
        view = source.view(tensor)
        crc = crc32_of(view)
        offset = writer.write(view, crc)
        packed: list[Prepacked] = []
        for blob_set in ref.prepacked:
            moved = []
            for blob in blob_set.blobs:
                blob_view = source.range(ref.location, blob.offset, blob.length, tensor.name)
                blob_crc = crc32_of(blob_view)
                blob_offset = writer.write(blob_view, blob_crc)
                moved.append(PrepackedBlob(blob_offset, blob.length))
                blobs.append(BlobEntry(tensor.name, blob_offset, blob.length, blob_crc))
            packed.append(Prepacked(blob_set.entry_key, blob_set.kernel_key, tuple(moved)))
        set_external(tensor, WEIGHT_FILE_NAME, offset, len(view), tuple(packed))
        tensors.append(_entry(tensor, offset, len(view), crc))
    return model, tensors, blobs


def pack_model(
    src: Path,
    out_dir: Path,
    *,
    optimize: bool = True,
    alignment: int = DEFAULT_ALIGNMENT,
    inline_below: int = DEFAULT_INLINE_BELOW,
    on_progress: ProgressCallback | None = None,
) -> PackReport:
    """Pack `src` into `out_dir` (created if missing). Files are built in a staging folder inside
    `out_dir` and moved in at the end, index last; files of an earlier pack that sessions still
    map stay valid (they are replaced, not overwritten). `on_progress` hears each phase
    (weights copied, onnxruntime's optimisation, pre-packed tensors moved). Raises
    ModelLoadError."""
    started = time.monotonic()
    if alignment <= 0 or alignment & (alignment - 1) or alignment % mmap.ALLOCATIONGRANULARITY:
        raise ModelLoadError(
            f"alignment {alignment} must be a power of two and a multiple of the page size "
            f"({mmap.ALLOCATIONGRANULARITY})"
        )
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model '{src}': {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pack-", dir=out_dir))
    try:
        with ExitStack() as stack:
            source = _SourceData(src.parent, stack)
            _inline_attribute_tensors(model, source)
            weight_path = staging / WEIGHT_FILE_NAME
            with open(weight_path, "wb") as f:
                writer = _WeightWriter(f, alignment)
                entries, inline = _write_portable(model, source, writer, inline_below, on_progress)
                portable_end = writer.end
                f.truncate(portable_end)
            writer.forget()
            onnx.save_model(model, str(staging / GRAPH_NAME))
            optimized = None
            if optimize and entries:
                optimized = _add_optimized(
                    staging, entries, alignment, inline_below, stack, on_progress
                )
            file_bytes = weight_path.stat().st_size
        index = PackIndex(
            weight_file=WEIGHT_FILE_NAME,
            weight_file_size=file_bytes,
            alignment=alignment,
            graph=GRAPH_NAME,
            tensors=tuple(entries),
            optimized=optimized,
            source=src.name,
            extra={"inline_below": inline_below},
        )
        names = [WEIGHT_FILE_NAME, GRAPH_NAME] + ([OPTIMIZED_GRAPH_NAME] if optimized else [])
        for name in names:
            os.replace(staging / name, out_dir / name)
        if optimized is None:
            (out_dir / OPTIMIZED_GRAPH_NAME).unlink(missing_ok=True)
        write_index(out_dir, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    blobs = optimized.blobs if optimized else ()
    return PackReport(
        out_dir=out_dir,
        graph=out_dir / GRAPH_NAME,
        optimized_graph=out_dir / OPTIMIZED_GRAPH_NAME if optimized else None,
        weight_file=out_dir / WEIGHT_FILE_NAME,
        tensors=len(entries),
        inline_tensors=inline,
        weight_bytes=sum(e.length for e in entries),
        prepacked_blobs=len(blobs),
        prepacked_bytes=sum(b.length for b in blobs),
        file_bytes=file_bytes,
        seconds=time.monotonic() - started,
    )


def _add_optimized(
    staging: Path,
    entries: list[TensorEntry],
    alignment: int,
    inline_below: int,
    stack: ExitStack,
    on_progress: ProgressCallback | None = None,
) -> OptimizedGraph:
    ort_dir = staging / "ort"
    ort_dir.mkdir()
    ort_graph = ort_dir / OPTIMIZED_GRAPH_NAME
    if on_progress is not None:  # one opaque step: onnxruntime reports nothing while it works
        on_progress("onnxruntime CPU optimisation", 0, 1, "step")
    _optimize_with_ort(staging / GRAPH_NAME, ort_graph, inline_below)
    if on_progress is not None:
        on_progress("onnxruntime CPU optimisation", 1, 1, "step")
    weight_path = staging / WEIGHT_FILE_NAME
    with ExitStack() as inner:
        portable = _map_readonly(weight_path, inner)
        with open(weight_path, "r+b") as f:
            writer = _WeightWriter(f, alignment, start=os.fstat(f.fileno()).st_size)
            if portable is not None:
                for e in entries:
                    writer.remember(
                        e.offset, memoryview(portable)[e.offset : e.offset + e.length], e.crc32
                    )
            model, tensors, blobs = _relayout_optimized(ort_graph, writer, inner, on_progress)
            writer.forget()
            f.truncate(max(writer.end, os.fstat(f.fileno()).st_size))
    onnx.save_model(model, str(staging / OPTIMIZED_GRAPH_NAME))
    shutil.rmtree(ort_dir)
    return OptimizedGraph(
        graph=OPTIMIZED_GRAPH_NAME,
        level="all",
        fingerprint=cpu_fingerprint(),
        tensors=tuple(tensors),
        blobs=tuple(blobs),
    )
