"""Deciding, when an execution slot is free, which queued requests form the next batch and whether
to send it now or wait for more. Pure functions of the queue contents and a clock reading, so the
rules are testable without threads.

The rules (Triton's dynamic batcher):

1. The candidate is the longest run of queued requests, in service order, that share one batching
   key (equal input sets; equal shapes for inputs with variable dims) and whose batch dimensions
   sum to at most max_batch_size. A request is never split; a request that does not fit or does
   not match ends the candidate ("full": it cannot grow, so it goes now).
2. While the delay has not run out, a candidate that reached a preferred batch size is cut at the
   largest preferred size reached (and one that outgrew every preferred size is cut before the
   request that overshot).
3. Otherwise everything in the candidate goes when it is full, when it reached the largest
   preferred size (max_batch_size when none is set), when the delay has run out, or when the
   server is draining.
4. Otherwise wait: until the send-by time the DelayPolicy gives, or until a request arrives.

"The delay" is measured from the oldest request of the candidate (monotonic clock). With
max_queue_delay 0 nothing waits, yet whatever queued while every slot was busy still goes together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pipeserve.batching.queues import Entry


class DelayPolicy(Protocol):
    """How long a batch that could still grow may wait (FixedDelay below, AdaptiveDelay in
    adaptive.py)."""

    def expired(self, oldest_ns: int, now_ns: int) -> bool:
        """The candidate's oldest request has waited as long as it ever may: send all now."""
        ...

    def send_by(self, queued: int, oldest_ns: int, now_ns: int) -> int:
        """Monotonic ns by which a growable batch of `queued` items must go (<= now: now)."""
        ...


class FixedDelay:
    """Triton's max_queue_delay_microseconds."""

    __slots__ = ("_delay_ns",)

    def __init__(self, delay_ns: int) -> None:
        self._delay_ns = delay_ns

    def expired(self, oldest_ns: int, now_ns: int) -> bool:
        # Triton: a zero delay never "expires", so preferred sizes still cut batches.
        return self._delay_ns > 0 and now_ns - oldest_ns >= self._delay_ns

    def send_by(self, queued: int, oldest_ns: int, now_ns: int) -> int:
        return oldest_ns + self._delay_ns


@dataclass(frozen=True, slots=True)
class Decision:
    batch: list[Entry]  # send these now (empty: wait)
    wake_ns: int = 0  # when waiting: look again at this monotonic time (0: only on arrival)


def decide(
    entries: Iterable[Entry],
    *,
    max_batch_size: int,
    preferred: frozenset[int],
    max_preferred: int,
    delay: DelayPolicy,
    now_ns: int,
    draining: bool,
) -> Decision:
    """Apply the rules above to the queued entries (in service order)."""
    candidate: list[Entry] = []
    total = 0
    full = False
    cut = 0  # entries in the preferred cut (rule 2)
    oldest = 0
    for e in entries:
        if candidate and (e.key != candidate[0].key or total + e.size > max_batch_size):
            full = True
            break
        if not cut and preferred and total and total + e.size > max_preferred:
            cut = len(candidate)  # outgrew every preferred size: cut before this request
        if not candidate or e.enqueued_ns < oldest:
            oldest = e.enqueued_ns
        candidate.append(e)
        total += e.size
        if total in preferred:
            cut = len(candidate)
        if total >= max_batch_size:
            full = True
            break
    if not candidate:
        return Decision([])
    if draining:
        return Decision(candidate)
    expired = delay.expired(oldest, now_ns)
    if cut and not expired:
        return Decision(candidate[:cut])
    if full or expired or total >= max_preferred:
        return Decision(candidate)
    send_by = delay.send_by(total, oldest, now_ns)
    if send_by <= now_ns:
        return Decision(candidate)
    return Decision([], send_by)
