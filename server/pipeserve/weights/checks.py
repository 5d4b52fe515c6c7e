"""Cheap integrity checks of mapped weights, made before anything is mapped.

Sizes are always checked: a graph's external references against the pack index (same file,
offsets and lengths) or, without an index, against the files themselves. The crc32 pass is
opt-in (about a second per GB). Every failure is a ModelLoadError naming the tensor and the file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeserve.errors import ModelLoadError
from pipeserve.weights.external_data import ExternalRef
from pipeserve.weights.pack_index import PackIndex, TensorEntry, crc32_of


@dataclass(frozen=True, slots=True)
class ByteRange:
    path: Path
    offset: int
    length: int


def index_entries(index: PackIndex, graph_name: str | None) -> list[TensorEntry]:
    """The entries of the graph being loaded; for a graph built in memory (a stage), both."""
    opt = index.optimized
    if graph_name == index.graph or opt is None:
        return list(index.tensors)
    if graph_name == opt.graph:
        return list(opt.tensors)
    return list(index.tensors) + list(opt.tensors)


def check_against_index(
    refs: Sequence[ExternalRef], index: PackIndex, folder: Path, graph_name: str | None
) -> None:
    """The graph must reference the index's weight file at the index's offsets, and the file must
    be as long as the index says (a shorter one is truncated, a longer one is another file)."""
    known: dict[str, list[TensorEntry]] = {}
    for entry in index_entries(index, graph_name):
        known.setdefault(entry.name, []).append(entry)
    weight_path = folder / index.weight_file
    for ref in refs:
        if ref.location != index.weight_file:
            raise ModelLoadError(
                f"initializer '{ref.name}' refers to '{ref.location}', but the index of "
                f"'{folder}' lists only '{index.weight_file}'"
            )
        candidates = known.get(ref.name, [])
        if not any(e.offset == ref.offset and e.length == ref.length for e in candidates):
            said = ", ".join(f"offset {e.offset} length {e.length}" for e in candidates)
            raise ModelLoadError(
                f"initializer '{ref.name}': the graph puts it at offset {ref.offset} length "
                f"{ref.length} of '{weight_path}', the index says "
                f"{said or 'nothing (not listed)'}; the index does not belong to this graph"
            )
    try:
        size = weight_path.stat().st_size
    except FileNotFoundError:
        raise ModelLoadError(
            f"weight file '{weight_path}' is missing (needed by initializer '{refs[0].name}')"
        ) from None
    if size != index.weight_file_size:
        short = first_beyond(refs, size)
        what = f"; initializer '{short.name}' lies beyond its end" if short else ""
        raise ModelLoadError(
            f"weight file '{weight_path}' is {size} bytes, the index says "
            f"{index.weight_file_size}{what}"
        )


def first_beyond(refs: Iterable[ExternalRef], size: int) -> ExternalRef | None:
    return next((ref for ref in refs if end_of(ref) > size), None)


def resolver(folder: Path) -> Callable[[str], Path]:
    """location -> absolute path, resolved once per distinct location."""
    return functools.cache(lambda location: (folder / location).resolve())


def check_files(refs: Sequence[ExternalRef], folder: Path) -> dict[Path, int]:
    """Every referenced file exists and holds every referenced range. Returns the file sizes."""
    resolve = resolver(folder)
    sizes: dict[Path, int] = {}
    for ref in refs:
        path = resolve(ref.location)
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except FileNotFoundError:
                raise ModelLoadError(
                    f"initializer '{ref.name}': weight file '{folder / ref.location}' is missing"
                ) from None
        if end_of(ref) > sizes[path]:
            raise ModelLoadError(
                f"initializer '{ref.name}': needs bytes up to "
                f"{end_of(ref)} of '{folder / ref.location}', which has only {sizes[path]} "
                f"(truncated or wrong file)"
            )
    return sizes


def end_of(ref: ExternalRef) -> int:
    ends = [ref.offset + ref.length]
    ends += [b.offset + b.length for s in ref.prepacked for b in s.blobs]
    return max(ends)


def byte_ranges(refs: Sequence[ExternalRef], folder: Path) -> list[ByteRange]:
    resolve = resolver(folder)
    out = []
    for ref in refs:
        path = resolve(ref.location)
        out.append(ByteRange(path, ref.offset, ref.length))
        out += [ByteRange(path, b.offset, b.length) for s in ref.prepacked for b in s.blobs]
    return out


def verify_checksums(
    index: PackIndex,
    refs: Sequence[ExternalRef],
    view: Callable[[ExternalRef], memoryview],
    folder: Path,
) -> None:
    """Full crc32 pass over what the graph uses (slow: about a second per GB)."""
    entries = {(e.name, e.offset): e for e in index_entries(index, None)}
    path = folder / index.weight_file
    for ref in refs:
        entry = entries[(ref.name, ref.offset)]
        got = crc32_of(view(ref))
        if got != entry.crc32:
            raise ModelLoadError(
                f"initializer '{ref.name}': checksum of bytes {ref.offset}.."
                f"{ref.offset + ref.length} of '{path}' is {got:08x}, the index says "
                f"{entry.crc32:08x} (file corrupted)"
            )
