"""Prefetch: get a session's weight ranges into the page cache before page faults ask for them.

Lazy page faults read a cold file a few pages at a time. "willneed" asks the kernel for
readahead of exactly the ranges a session will read (madvise(MADV_WILLNEED), asynchronous, cheap
when the cache is warm); "read" reads them with a few threads (pread releases the GIL) while
onnxruntime builds the session, so a cold file is read at the device's queue depth.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pipeserve.weights.checks import ByteRange

log = logging.getLogger(__name__)

Prefetch = bool | Literal["none", "willneed", "read"]

_READ_CHUNK = 8 << 20
_READ_WORKERS = 4


def prefetch_mode(prefetch: Prefetch) -> str:
    if prefetch is True:
        return "willneed"
    if prefetch is False:
        return "none"
    if prefetch not in ("none", "willneed", "read"):
        raise ValueError(
            f"prefetch must be True, False, 'none', 'willneed' or 'read', got {prefetch!r}"
        )
    return prefetch


class PrefetchJob:
    """One prefetch over `ranges` of the mapped files `maps`. start() returns at once for
    "willneed" and "read" alike ("read" runs on a thread); wait() joins it."""

    def __init__(self, mode: str, maps: Mapping[Path, mmap.mmap], ranges: Sequence[ByteRange]):
        self._mode = mode
        self._maps = maps
        self._ranges = merged(ranges)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._mode == "willneed":
            self._willneed()
        elif self._mode == "read":
            self._thread = threading.Thread(target=self._read, name="weights-prefetch", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        """Join a running read; a failed prefetch is logged, never raised: loading does not
        depend on it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            log.warning("weight prefetch failed (loading went on without it): %s", error)

    def _willneed(self) -> None:
        page = mmap.PAGESIZE
        for r in self._ranges:
            start = r.offset - r.offset % page
            self._maps[r.path].madvise(mmap.MADV_WILLNEED, start, r.offset + r.length - start)

    def _read(self) -> None:
        try:
            parallel_read(self._ranges, _READ_WORKERS)
        except BaseException as exc:  # reported by wait()
            self._error = exc


def merged(ranges: Iterable[ByteRange], gap: int = 64 << 10) -> list[ByteRange]:
    """Sorted ranges with neighbours closer than `gap` joined (fewer, larger requests)."""
    out: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: (str(r.path), r.offset)):
        if r.length == 0:
            continue
        last = out[-1] if out else None
        if last is not None and last.path == r.path and r.offset <= last.offset + last.length + gap:
            end = max(last.offset + last.length, r.offset + r.length)
            out[-1] = ByteRange(last.path, last.offset, end - last.offset)
        else:
            out.append(r)
    return out


def parallel_read(ranges: Sequence[ByteRange], workers: int) -> None:
    """Read the ranges with `workers` threads (pread releases the GIL), so a cold file is read at
    the device's queue depth instead of one page fault at a time."""
    chunks = []
    for r in merged(ranges):
        for start in range(r.offset, r.offset + r.length, _READ_CHUNK):
            chunks.append((r.path, start, min(_READ_CHUNK, r.offset + r.length - start)))
    fds = {path: os.open(path, os.O_RDONLY) for path in {c[0] for c in chunks}}
    local = threading.local()

    def read(chunk: tuple[Path, int, int]) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(_READ_CHUNK)
        path, start, length = chunk
        os.preadv(fds[path], [memoryview(buf)[:length]], start)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weights-read") as pool:
            list(pool.map(read, chunks))
    finally:
        for fd in fds.values():
            os.close(fd)
