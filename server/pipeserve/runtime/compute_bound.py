"""Is a model compute-bound? Measured once at load, it decides the default thread count.

The default thread rule (when `intra_op_thread_count` is not given): a CPU session gets the cores
less one, split between the model's CPU sessions, so the event loop, which every request passes
through (~100 us of CPU per request, docs/benchmarks.md), keeps a core while onnxruntime
computes. A model whose batch-1 run takes at least WIDE_MIN_NS is compute-bound: at the rates it
can be served, the front end needs a fraction of a core, and a core left to it would sit idle
while the model waits for it; its sessions get every core instead.

Measured on 2 cores (docs/benchmarks.md, issue 15): an 8-layer convnet (batch-1 run ~2.7 ms on
one thread) served 1.3-1.4x faster on both cores; the MLP 512-2048-2048-512 (~0.7 ms) served as
fast or faster on one thread (0.74-1.04x on two), as the front end's share of the CPU grows with
its request rate; the add-one model (~0.01 ms) did not care. The limit sits between the two.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnxruntime as ort

from pipeserve.tensors import numpy_dtype, triton_from_ort_type

log = logging.getLogger(__name__)

WIDE_MIN_NS = 1_500_000
_RUNS = 5
# A first run this slow settles it at once: a big model's load is not held up by more runs.
_CLEARLY_NS = 20 * WIDE_MIN_NS

# Datatypes that do not reach onnxruntime as plain numeric arrays (object arrays, OrtValues):
# a model with such an input is not measured.
_UNMEASURED = frozenset({"BYTES", "BF16"})


def batch_one_ns(session: ort.InferenceSession) -> int | None:
    """Shortest of a few runs on one zero-filled sample (every variable dimension 1, which counts
    a model with variable sizes as cheap: it keeps the default): other models loading at the
    same time only ever make a run slower. It stops at the first run under WIDE_MIN_NS, and
    after the first (allocating) run when that alone took over 30 ms, so the measurement costs
    a load at most ~6 runs of a model that takes 30 ms. None when the inputs cannot be made or
    the run fails (then nothing changes)."""
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        try:
            datatype = triton_from_ort_type(arg.type)
        except ValueError:
            return None
        if datatype in _UNMEASURED:
            return None
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in arg.shape]
        feeds[arg.name] = np.zeros(shape, dtype=numpy_dtype(datatype))
    try:
        start = time.perf_counter_ns()
        session.run(None, feeds)  # the first run also allocates and picks kernels
        first = time.perf_counter_ns() - start
        if first >= _CLEARLY_NS:
            return first
        best = first
        for _ in range(_RUNS):
            if best < WIDE_MIN_NS:
                break
            start = time.perf_counter_ns()
            session.run(None, feeds)
            best = min(best, time.perf_counter_ns() - start)
    except Exception as exc:  # zeros are not valid input for every model (indices, masks)
        log.debug("batch-1 timing skipped: %s", exc)
        return None
    return best


def is_compute_bound(measured_ns: int | None) -> bool:
    return measured_ns is not None and measured_ns >= WIDE_MIN_NS
