"""Memory-mapped weights: open an onnxruntime session over weights that live in files.

What onnxruntime 1.31 does with weights, measured (bench/load.py, docs/weights.md):

- Loading a graph by path, onnxruntime maps each external initializer itself (read-only private
  mappings: pages are shared with the page cache, no copy). What costs time and memory is
  pre-packing: the CPU MatMul kernel re-lays every weight matrix into a private heap buffer at
  every load (about one extra copy of the weights per session). Turning pre-packing off
  (`session.disable_prepacking`) makes loading near-instant but halves MatMul speed at small
  batches, because MLAS then packs B on every call.
- `pipeserve pack` therefore runs onnxruntime's optimiser once and stores the pre-packed blobs in
  weights.bin (`model.cpu.onnx`). Loaded by path, onnxruntime still packs and hashes each weight
  to find its blob (that is the remaining load time), but then serves from the file mapping, so
  sessions keep no private copy and instances share pages.
- Handing weights over as OrtValues: `SessionOptions.add_initializer` takes an OrtValue over our
  mapping without copying; `add_external_initializers` copies every tensor;
  `add_external_initializers_from_files_in_memory` with
  `session.use_external_initializer_file_buffers_directly=1` does not copy. None of the three
  picks up serialised pre-packed blobs, and pre-packing from our mapping keeps every mapped page
  resident besides the packed copy. So on the CPU the weights are handed over by path (ORT maps
  them) and this module's mapping is used for checks and prefetch; OrtValues are used for the
  GPU copy and on request (`placement="initializers"`).

Lifetime: a MappedWeights must outlive every session created with it; close it after the
sessions are dropped (close() refuses while a session that borrows its memory is alive).
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from pipeserve.errors import ModelLoadError
from pipeserve.weights.checks import (
    ByteRange,
    byte_ranges,
    check_against_index,
    check_files,
    resolver,
)
from pipeserve.weights.checks import verify_checksums as verify_crc32
from pipeserve.weights.external_data import (
    ExternalRef,
    external_refs,
    is_sub_byte,
    iter_initializers,
)
from pipeserve.weights.pack_index import PackIndex, cpu_fingerprint, read_index
from pipeserve.weights.prefetch import Prefetch, PrefetchJob, prefetch_mode

log = logging.getLogger(__name__)

Placement = Literal["auto", "ort", "initializers", "device"]

_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class MappedWeights:
    """Owns read-only mappings of a model's weight files and the arrays/OrtValues made over them.

    Thread safety: built and closed by the loading thread; sessions only read the memory.
    """

    def __init__(
        self,
        maps: dict[Path, mmap.mmap],
        refs: Sequence[ExternalRef],
        folder: Path,
        ranges: Sequence[ByteRange],
    ) -> None:
        self._maps = maps
        self._refs = {r.name: r for r in refs}
        self._resolve = resolver(folder)
        self.ranges = tuple(ranges)  # what a session reads: tensors and pre-packed blobs
        # OrtValues (and their arrays) handed to onnxruntime by add_initializer: onnxruntime
        # borrows them, so they live exactly as long as this object.
        self._borrowed: list[tuple[Any, Any]] = []
        self._borrowers: list[weakref.ref[Any]] = []
        self._prefetch: PrefetchJob | None = None
        self.placement: str = "ort"
        self.graph_path: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(self._maps)

    @property
    def weight_bytes(self) -> int:
        return sum(r.length for r in self._refs.values())

    @property
    def closed(self) -> bool:
        return not self._maps

    def array(self, name: str) -> np.ndarray:
        """A read-only view of initializer `name` on the mapping, with its dtype and shape (no
        copy). 4-bit types come back as their packed bytes."""
        ref = self._refs.get(name)
        if ref is None:
            raise KeyError(f"no external initializer named '{name}'")
        return self._view(ref, typed=True)

    def _view(self, ref: ExternalRef, *, typed: bool = False) -> np.ndarray:
        """The bytes of `ref` on the mapping; with `typed`, as its ONNX dtype and shape."""
        if ref.length == 0:
            return np.zeros(0, dtype=np.uint8)
        mapped = self._maps[self._resolve(ref.location)]
        flat = np.frombuffer(mapped, dtype=np.uint8, count=ref.length, offset=ref.offset)
        if not typed or is_sub_byte(ref.data_type):
            return flat
        return flat.view(helper.tensor_dtype_to_np_dtype(ref.data_type)).reshape(ref.dims)

    def _borrow(self, session: Any) -> None:
        self._borrowers.append(weakref.ref(session))

    def release_resident(self) -> None:
        """Drop this process's page-table entries for the mapping (MADV_DONTNEED). Safe at any
        time: the mapping is read-only and file-backed, so a later read faults the page back in
        from the page cache. Used after copying weights to a GPU."""
        for mapped in self._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)

    def prefetch(self, mode: str) -> None:
        """Start prefetching the ranges a session reads (see prefetch.py)."""
        self._prefetch = PrefetchJob(mode, self._maps, self.ranges)
        self._prefetch.start()

    def wait_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.wait()

    def close(self) -> None:
        """Unmap. Sessions that borrowed this memory must be gone first."""
        alive = sum(1 for ref in self._borrowers if ref() is not None)
        if alive:
            raise RuntimeError(
                f"MappedWeights.close() while {alive} session(s) still use its memory; "
                f"drop the sessions first"
            )
        self.wait_prefetch()
        self._borrowed.clear()
        maps, self._maps = self._maps, {}
        for mapped in maps.values():
            mapped.close()

    def __enter__(self) -> MappedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- choosing and checking what to map ----------------------------------------------------------


def _is_cpu_only(providers: Sequence[Any]) -> bool:
    return all(_provider_name(p) == "CPUExecutionProvider" for p in providers)


def _provider_name(provider: Any) -> str:
    return provider if isinstance(provider, str) else str(provider[0])


def _cuda_device(providers: Sequence[Any]) -> int | None:
    for p in providers:
        if _provider_name(p) == "CUDAExecutionProvider":
            options = {} if isinstance(p, str) else dict(p[1])
            return int(options.get("device_id", 0))
    return None


def select_graph(model_path: Path, providers: Sequence[Any], *, prepack: bool = True) -> Path:
    """The graph file to load for `model_path`: in a packed folder, the pack-time optimised CPU
    graph when it was made on a machine like this one (same onnxruntime and instruction set) and
    the session runs on the CPU with pre-packing; the portable graph otherwise."""
    return _select(Path(model_path), providers, prepack)[0]


def _select(
    model_path: Path, providers: Sequence[Any], prepack: bool
) -> tuple[Path, PackIndex | None]:
    index = read_index(model_path.parent)
    if index is None or model_path.name not in _graph_names(index):
        return model_path, None
    opt = index.optimized
    portable = model_path.parent / index.graph
    if opt is None or not prepack or not _is_cpu_only(providers):
        return portable, index
    if opt.fingerprint != cpu_fingerprint():
        log.warning(
            "%s was optimised on another machine or onnxruntime (%s, here %s); loading the "
            "portable graph %s instead",
            opt.graph,
            opt.fingerprint,
            cpu_fingerprint(),
            index.graph,
        )
        return portable, index
    return model_path.parent / opt.graph, index


def _graph_names(index: PackIndex) -> set[str]:
    names = {index.graph}
    if index.optimized is not None:
        names.add(index.optimized.graph)
    return names


# --- opening sessions ---------------------------------------------------------------------------


def open_session(
    model_path: Path,
    providers: list[Any],
    options: ort.SessionOptions,
    *,
    prefetch: Prefetch = True,
    prepack: bool = True,
    verify_checksums: bool = False,
    placement: Placement = "auto",
) -> tuple[ort.InferenceSession, MappedWeights | None]:
    """Open `model_path` with its weights mapped. Returns the session and the MappedWeights that
    must outlive it (None for a model whose weights are all inline: a plain session).

    - Packed folder (weights.index.json beside the graph): the graph is checked against the index
      (offsets, lengths, file size) and the pack-time CPU graph is used where it fits (see
      select_graph). Unpacked external data: every file and range is checked.
    - `prefetch`: True/"willneed" asks for readahead of exactly the ranges the session reads;
      "read" reads them with parallel threads while the session is built; False/"none" leaves it
      to page faults.
    - `prepack=False` sets `session.disable_prepacking`: near-instant load, no private copy,
      slower MatMul (see the module docstring).
    - `placement`: "auto" is "device" when a CUDA provider is listed, else "ort".

    `options` is adjusted in place (optimisation level for a pre-optimised graph, config
    entries, initializers): pass a fresh SessionOptions per call. Raises ModelLoadError naming
    the tensor and file when weights are missing, truncated or do not match the index.
    """
    graph_path, index = _select(Path(model_path), providers, prepack)
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except FileNotFoundError:
        raise ModelLoadError(f"model file '{graph_path}' does not exist") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX model '{graph_path}': {exc}") from None
    if index is not None and index.optimized and graph_path.name == index.optimized.graph:
        # Optimised at pack time: optimising again would only redo (and copy) the same work.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _open(
        model,
        graph_path.parent,
        providers,
        options,
        index=index,
        graph_path=graph_path,
        prefetch=prefetch,
        prepack=prepack,
        verify_checksums=verify_checksums,
        placement=placement,
    )


def open_stage_session(
    stage: onnx.ModelProto,
    weights_dir: Path,
    providers: list[Any],
    options: ort.SessionOptions,
    *,
    prefetch: Prefetch = True,
    prepack: bool = True,
    verify_checksums: bool = False,
    placement: Placement = "auto",
) -> tuple[ort.InferenceSession, MappedWeights | None]:
    """Like open_session for a graph built in memory (a pipeline stage cut from a graph loaded
    with `load_external_data=False`): its external initializers keep their location/offset/length
    (and pre-packed blobs) and are found in `weights_dir`. Only the ranges this stage references
    are checked, mapped and prefetched, so each stage maps only its own weights."""
    weights_dir = Path(weights_dir)
    index = read_index(weights_dir)
    if index is not None and index.optimized and _uses_contrib_ops(stage):
        # Cut from the pre-optimised CPU graph: do not optimise it a second time.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _open(
        stage,
        weights_dir,
        providers,
        options,
        index=index,
        graph_path=None,
        prefetch=prefetch,
        prepack=prepack,
        verify_checksums=verify_checksums,
        placement=placement,
    )


def _uses_contrib_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain not in ("", "ai.onnx") for node in model.graph.node)


def _open(
    model: onnx.ModelProto,
    folder: Path,
    providers: list[Any],
    options: ort.SessionOptions,
    *,
    index: PackIndex | None,
    graph_path: Path | None,
    prefetch: Prefetch,
    prepack: bool,
    verify_checksums: bool,
    placement: Placement,
) -> tuple[ort.InferenceSession, MappedWeights | None]:
    mode = prefetch_mode(prefetch)
    refs = external_refs(model)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not refs:
        return _create(model, graph_path, folder, providers, options), None
    if index is not None:
        check_against_index(refs, index, folder, graph_path.name if graph_path else None)
    sizes = check_files(refs, folder)
    weights = _map(sizes, refs, folder)
    weights.graph_path = graph_path
    try:
        if verify_checksums:
            if index is None:
                raise ModelLoadError(
                    f"cannot verify checksums of '{folder}': it has no weight index "
                    f"(run `pipeserve pack`)"
                )
            verify_crc32(index, refs, lambda ref: weights._view(ref).data, folder)  # noqa: SLF001
        weights.prefetch(mode)
        device = _cuda_device(providers)
        if placement == "auto":
            placement = "device" if device is not None else "ort"
        weights.placement = placement
        if (
            placement == "device"
            and device is not None
            and _add_device_initializers(model, weights, options, device)
        ):
            session = _create(model, None, folder, providers, options)
            weights._borrow(session)  # noqa: SLF001 - same module
            weights.release_resident()  # the copies live on the GPU now
        elif placement == "initializers":
            _add_host_initializers(model, weights, options)
            session = _create(model, None, folder, providers, options)
            weights._borrow(session)  # noqa: SLF001 - same module
        else:
            weights.placement = "ort"
            session = _create(model, graph_path, folder, providers, options)
        weights.wait_prefetch()
    except BaseException:
        weights.close()
        raise
    return session, weights


def _map(sizes: dict[Path, int], refs: Sequence[ExternalRef], folder: Path) -> MappedWeights:
    maps: dict[Path, mmap.mmap] = {}
    try:
        for path, size in sizes.items():
            if size == 0:
                continue
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        for mapped in maps.values():
            mapped.close()
        raise ModelLoadError(f"cannot map weight file: {exc}") from None
    return MappedWeights(maps, refs, folder, byte_ranges(refs, folder))


def _create(
    model: onnx.ModelProto,
    graph_path: Path | None,
    folder: Path,
    providers: list[Any],
    options: ort.SessionOptions,
) -> ort.InferenceSession:
    try:
        if graph_path is not None:
            return ort.InferenceSession(str(graph_path), options, providers=providers)
        # A graph in memory: onnxruntime resolves external-data locations against this folder.
        options.add_session_config_entry(_FOLDER_KEY, str(folder))
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        where = graph_path or folder
        raise ModelLoadError(f"onnxruntime could not load '{where}': {exc}") from None


def _typed_views(
    model: onnx.ModelProto, weights: MappedWeights
) -> Iterable[tuple[TensorProto, np.ndarray]]:
    for tensor in iter_initializers(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor, weights.array(tensor.name)


def _add_host_initializers(
    model: onnx.ModelProto, weights: MappedWeights, options: ort.SessionOptions
) -> None:
    """OrtValues over the mapping, borrowed by onnxruntime (measured: no copy)."""
    for tensor, array in _typed_views(model, weights):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        weights._borrowed.append((array, value))  # noqa: SLF001 - same module
        options.add_initializer(tensor.name, value)


def _add_device_initializers(
    model: onnx.ModelProto, weights: MappedWeights, options: ort.SessionOptions, device_id: int
) -> bool:
    """Copy each tensor from the mapping to GPU `device_id`, in file order (one host-to-device
    copy per tensor, read sequentially from the mapping), and hand the device OrtValues to
    onnxruntime. Returns False (nothing added) when no CUDA device is usable, in which case
    onnxruntime loads the weights itself.

    NOT RUN on the development machine (no GPU there); see docs/weights.md.
    """
    try:
        probe = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", device_id)
        del probe
    except Exception as exc:  # no GPU, no CUDA libraries, or a bad device id
        # Only the text is kept: the exception's frames must not pin views of the mapping.
        log.warning(
            "CUDA device %d not usable for weight upload (%s); onnxruntime will load the "
            "weights itself",
            device_id,
            str(exc).strip(),
        )
        return False
    views = sorted(_typed_views(model, weights), key=lambda tv: weights._refs[tv[0].name].offset)  # noqa: SLF001
    for tensor, array in views:
        value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)
        weights._borrowed.append((None, value))  # noqa: SLF001 - device memory, no host ref
        options.add_initializer(tensor.name, value)
    return True


def release_weights(weights: list[MappedWeights]) -> None:
    """Unmap weight files once their sessions are gone; a mapping still borrowed (a session kept
    alive elsewhere) is left for the garbage collector rather than failing the unload."""
    for w in weights:
        try:
            w.close()
        except RuntimeError as exc:
            log.warning("weights stay mapped until their last session is freed: %s", exc)
    weights.clear()
