"""Run one batch of pending requests on a slot: gather, execute, split, answer. Shared by every
scheduler so timings, statistics and error fan-out are the same whichever scheduler formed the
batch.

Runs on a scheduler's worker thread, or on the event loop for a batch the loop runs itself
(`on_loop`: dynamic.py's inline execution), which then sets the answers directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from pipeserve.batching.base import ModelRunner, Pending
from pipeserve.errors import ExecutionError, PipeserveError, RequestCancelledError
from pipeserve.inference import ModelSpec
from pipeserve.observers import ExecutionTimings, InferenceObserver

Answer = tuple[Pending, dict[str, np.ndarray] | None, Exception | None]


def resolve(
    pending: Pending, outputs: dict[str, np.ndarray] | None, error: Exception | None
) -> None:
    """Answer a pending request from any thread (exactly once; a cancelled future is left alone)."""
    resolve_all([(pending, outputs, error)])


def resolve_all(answers: Sequence[Answer], on_loop: bool = False) -> None:
    """Answer several requests with one wake-up of the event loop (each call_soon_threadsafe is a
    write to the loop's self-pipe; a batch of n would otherwise cost n). All of them belong to the
    same loop: a server runs one event loop. `on_loop`: called on that loop, so set them now."""
    if on_loop:
        _set_all(answers)
    elif answers:
        answers[0][0].loop.call_soon_threadsafe(_set_all, answers)


def _set_all(answers: Sequence[Answer]) -> None:
    for pending, outputs, error in answers:
        if pending.future.done():
            continue
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(outputs)  # type: ignore[arg-type]


def fail(pending: Pending, error: PipeserveError, observer: InferenceObserver) -> None:
    """Answer with an error and record it."""
    observer.request_failed(error.reason, time.monotonic_ns() - pending.request.arrival_ns)
    observer.pending_changed(-1)
    resolve(pending, None, error)


def execute_batch(
    runner: ModelRunner,
    slot: int,
    batch: Sequence[Pending],
    spec: ModelSpec,
    observer: InferenceObserver,
    on_loop: bool = False,
    release: Callable[[int], None] | None = None,
) -> None:
    """Execute `batch` (already dequeued, in order) and answer every request in it.

    `release(held_ns)`: called once the slot is free again (the runner has returned or raised,
    or nothing was left to run: 0 ns), with the time the batch held it (gathering the inputs and
    running), before any answer is posted, so a scheduler's book-keeping is current by the time
    a client can send its next request.

    Cancelled requests are dropped before execution and counted as CANCELED failures. An exception
    from the runner fails every remaining request of the batch with ExecutionError.
    """
    live: list[Pending] = []
    for p in batch:
        if p.cancelled():
            fail(p, RequestCancelledError("request was cancelled before execution"), observer)
        else:
            live.append(p)
    if not live:
        if release is not None:
            release(0)
        return

    t0 = time.monotonic_ns()
    inputs = _gather(live, spec)
    wanted = _output_names(live, spec)
    t1 = time.monotonic_ns()
    try:
        outputs = runner.run(slot, inputs, wanted)
    except Exception as exc:  # any runtime failure fails the whole batch, the worker goes on
        t2 = time.monotonic_ns()
        if release is not None:
            release(t2 - t0)
        total = sum(p.request.batch_size for p in live)
        observer.execution_done(ExecutionTimings(total, t1 - t0, t2 - t1, 0))
        message = exc.message if isinstance(exc, PipeserveError) else str(exc)
        for p in live:
            fail(
                p, ExecutionError(f"onnxruntime failed on model '{spec.name}': {message}"), observer
            )
        return
    t2 = time.monotonic_ns()
    if release is not None:
        release(t2 - t0)
    try:
        parts = _split(live, outputs, spec)
    except PipeserveError as exc:
        t3 = time.monotonic_ns()
        total = sum(p.request.batch_size for p in live)
        observer.execution_done(ExecutionTimings(total, t1 - t0, t2 - t1, t3 - t2))
        for p in live:
            fail(p, exc, observer)
        return
    t3 = time.monotonic_ns()
    timings = ExecutionTimings(sum(p.request.batch_size for p in live), t1 - t0, t2 - t1, t3 - t2)
    observer.execution_done(timings)
    observer.requests_succeeded(
        timings,
        [
            (p.request.batch_size, t3 - p.request.arrival_ns, p.dequeued_ns - p.request.arrival_ns)
            for p in live
        ],
    )
    observer.pending_changed(-len(live))
    resolve_all([(p, result, None) for p, result in zip(live, parts, strict=True)], on_loop)


def _gather(live: Sequence[Pending], spec: ModelSpec) -> dict[str, np.ndarray]:
    """One request: its arrays as they are (no copy). Several: one concatenate per input."""
    if len(live) == 1:
        return live[0].request.inputs
    names = live[0].request.inputs.keys()
    return {name: np.concatenate([p.request.inputs[name] for p in live]) for name in names}


def _output_names(live: Sequence[Pending], spec: ModelSpec) -> list[str]:
    wanted: set[str] = set()
    for p in live:
        if not p.request.requested_outputs:
            return list(spec.output_names())
        wanted.update(p.request.requested_outputs)
    return [name for name in spec.output_names() if name in wanted]


def _split(
    live: Sequence[Pending], outputs: dict[str, np.ndarray], spec: ModelSpec
) -> list[dict[str, np.ndarray]]:
    """Slice each output back by batch offsets (views, no copies); keep only requested outputs."""
    if len(live) == 1:
        request = live[0].request
        if request.requested_outputs:
            return [{name: outputs[name] for name in request.requested_outputs}]
        return [outputs]
    total = sum(p.request.batch_size for p in live)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ExecutionError(
                f"model '{spec.name}' output '{name}' has batch dimension "
                f"{array.shape[0] if array.ndim else 'none'}, expected {total} (the batched "
                f"input size)"
            )
    parts: list[dict[str, np.ndarray]] = []
    offset = 0
    for p in live:
        end = offset + p.request.batch_size
        names = p.request.requested_outputs or tuple(outputs)
        parts.append({name: outputs[name][offset:end] for name in names})
        offset = end
    return parts
