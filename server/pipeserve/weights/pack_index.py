"""The index `pipeserve pack` writes beside a packed model, and the checks made against it.

A packed folder holds:

    model.onnx            the graph, every initializer >= `inline_below` bytes external in
                          weights.bin (ONNX's own fields: plain onnxruntime loads it too)
    model.cpu.onnx        optional: the same graph optimised by onnxruntime at pack time for the
                          CPU, its MatMul weights pre-packed into weights.bin (onnxruntime's
                          `prepacked_<n>` fields); used only where `fingerprint` matches
    weights.bin           every tensor at a 64 KiB-aligned offset (padding is a file hole)
    weights.index.json    this index: per tensor name, offset, length, dtype, shape, crc32

The index is written last, so a folder with an index is a complete pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from pipeserve.errors import ModelLoadError

INDEX_NAME = "weights.index.json"
INDEX_FORMAT = "pipeserve-weights"
INDEX_VERSION = 1
# zlib's crc32 runs over the file in pieces this big (it only takes contiguous buffers).
_CRC_CHUNK = 16 << 20


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    offset: int
    length: int
    dtype: str  # ONNX element type name, e.g. "FLOAT"
    shape: tuple[int, ...]
    crc32: int


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """A pre-packed blob: the tensor it belongs to, where it lies, its crc32."""

    tensor: str
    offset: int
    length: int
    crc32: int


@dataclass(frozen=True, slots=True)
class OptimizedGraph:
    graph: str
    level: str
    fingerprint: dict[str, str]
    tensors: tuple[TensorEntry, ...]  # raw tensors the optimised graph references
    blobs: tuple[BlobEntry, ...]  # its pre-packed weights


@dataclass(frozen=True, slots=True)
class PackIndex:
    weight_file: str
    weight_file_size: int
    alignment: int
    graph: str
    tensors: tuple[TensorEntry, ...]
    optimized: OptimizedGraph | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **asdict(self)}
        return json.dumps(body, indent=1)


def cpu_fingerprint() -> dict[str, str]:
    """What an onnxruntime CPU graph optimised at level ALL depends on: the onnxruntime build and
    the instruction set (layout transforms and pre-packed layouts follow the CPU's vector width)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return {
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
    }


def crc32_of(view: memoryview, on_chunk: Callable[[int], None] | None = None) -> int:
    """CRC-32 of `view`, in chunks; `on_chunk(nbytes)` hears each (progress of big tensors)."""
    crc = 0
    for start in range(0, len(view), _CRC_CHUNK):
        chunk = view[start : start + _CRC_CHUNK]
        crc = zlib.crc32(chunk, crc)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return crc


def _tensor(raw: dict[str, Any]) -> TensorEntry:
    return TensorEntry(
        str(raw["name"]),
        int(raw["offset"]),
        int(raw["length"]),
        str(raw["dtype"]),
        tuple(int(d) for d in raw["shape"]),
        int(raw["crc32"]),
    )


def read_index(folder: Path) -> PackIndex | None:
    """The index in `folder`, None when there is none (not a packed model). ModelLoadError when
    it exists but cannot be read."""
    path = folder / INDEX_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelLoadError(f"cannot read weight index '{path}': {exc}") from None
    try:
        raw = json.loads(text)
        if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
            raise ValueError(
                f"format {raw.get('format')!r} version {raw.get('version')!r}, expected "
                f"{INDEX_FORMAT!r} version {INDEX_VERSION}"
            )
        opt = raw.get("optimized")
        optimized = None
        if opt is not None:
            optimized = OptimizedGraph(
                str(opt["graph"]),
                str(opt["level"]),
                {str(k): str(v) for k, v in opt["fingerprint"].items()},
                tuple(_tensor(t) for t in opt["tensors"]),
                tuple(
                    BlobEntry(str(b["tensor"]), int(b["offset"]), int(b["length"]), int(b["crc32"]))
                    for b in opt["blobs"]
                ),
            )
        return PackIndex(
            weight_file=str(raw["weight_file"]),
            weight_file_size=int(raw["weight_file_size"]),
            alignment=int(raw["alignment"]),
            graph=str(raw["graph"]),
            tensors=tuple(_tensor(t) for t in raw["tensors"]),
            optimized=optimized,
            source=str(raw.get("source", "")),
            extra=dict(raw.get("extra", {})),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"weight index '{path}' is malformed: {exc}") from None


def write_index(folder: Path, index: PackIndex) -> None:
    """Write atomically: readers see the old index or the new one, never half of one."""
    tmp = folder / f".{INDEX_NAME}.tmp"
    tmp.write_text(index.to_json(), encoding="utf-8")
    os.replace(tmp, folder / INDEX_NAME)
