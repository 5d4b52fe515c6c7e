"""The adaptive batching delay (opt-in: `parameters { key: "batching_mode" value: { string_value:
"adaptive" } }`): instead of one fixed max_queue_delay, each wait is chosen from what the batcher
observes: arrivals, execution time per batch size, and how busy the execution slots are.

Model. Executing a batch of b items costs T(b) ~= a + c*b: `a` is what every execution pays once
(reading the weights, dispatch, kernel launches), `c` what each item adds; both are fitted by least
squares over the average time per executed batch size. Items arrive at rate L.

Two regimes, told apart by the slots' utilisation (busy time / wall time over recent batches):

1. Slot-bound (utilisation >= BUSY): waiting idles the bottleneck, so it is charged in full.
   Sending the S queued items now costs (a + c*S) / S slot time per item; waiting until S' items
   are queued costs ((S' - S) / L + a + c*S') / S'. For every S' > S the second is smaller exactly
   when S < a*L: while fewer items are queued than arrive during one fixed cost, waiting raises
   the throughput the slot sustains; once that many are queued it only adds latency. Silence
   counts: L uses max(mean gap, time since the last arrival), so when arrivals stop the wait ends
   a*m/S after the last one (m = mean items per request).
2. Host-bound (slots mostly idle while requests keep arriving that find others still in the
   batcher): the bottleneck is elsewhere (decoding, the network, CPU shared with the front end),
   and a waiting slot costs it nothing, while every execution does (its threads compete for the
   same cores, it pays `a` again). Then a batch waits as long as arrivals keep coming (each within
   SILENCE mean gaps of the last), up to the cap, and goes at once when it holds as many items as
   were ever outstanding lately (a decaying peak): with a closed loop of N clients, waiting for
   the N+1st would only idle everything until the silence is noticed.

In both, nothing waits unless arrivals overlap outstanding requests or the slot rule says so: a
single closed-loop client (its next request comes only after its answer) never waits, in either
regime. A wait never exceeds `cap` from the oldest queued request: max_queue_delay_microseconds
when the config sets it, else the estimated time of one execution at the largest preferred size.
Until executions of two different batch sizes have been timed nothing waits (delay 0), which is also
how the sizes get observed: with delay 0 a busy model forms batches of varied sizes. The forming
rules still cut at preferred sizes and max_batch_size.

Threading: `record_arrival` and `send_by`/`expired` are called with the batcher's lock held;
`record_execution` from worker threads after a batch, under this object's own lock. The fitted
(a, c) pair and the utilisation are published as plain attributes, so readers never see half an
update.
"""

from __future__ import annotations

import threading
from collections import deque

# Smoothing for the arrival gap, items-per-request and overlap averages (about the last 16).
_ARRIVAL_ALPHA = 1 / 16
# Smoothing for per-size execution times once a size has a few samples.
_EXEC_ALPHA = 1 / 8
# A size's weight in the fit saturates here, so one very common size cannot mask the others.
_MAX_WEIGHT = 32
# Utilisation below which the slots are not the bottleneck.
BUSY = 0.5
# Share of arrivals that must find other requests outstanding to call the load concurrent.
OVERLAP = 0.5
# Host-bound waits end after this many mean gaps without an arrival.
SILENCE = 2.0
# Executions over which utilisation is measured.
_UTILISATION_WINDOW = 64
# A gap between executions this long is a pause in the traffic, not idle slots under load: the
# window restarts, or the next burst would be judged by the pause (slots "idle", so wait for every
# client) until 64 executions had pushed it out.
_PAUSE_NS = 100_000_000
# The outstanding-items peak forgets one item per this many arrivals.
_PEAK_DECAY = 64


class AdaptiveDelay:
    def __init__(self, max_preferred: int, cap_ns: int = 0, slots: int = 1) -> None:
        self._max_preferred = max_preferred
        self._cap_ns = cap_ns  # 0: derived from the fitted cost model
        self._slots = max(1, slots)
        self._last_arrival_ns = 0
        self._mean_gap_ns = 0.0
        self._mean_items = 1.0
        self._overlap = 0.0  # share of arrivals finding other requests outstanding
        self._peak = 0.0  # decaying peak of items outstanding, this arrival included
        self._lock = threading.Lock()
        self._by_size: dict[int, tuple[float, int]] = {}  # size -> (mean ns, samples)
        self._fit: tuple[float, float] | None = None  # (a ns, c ns per item)
        self._recent: deque[tuple[int, int]] = deque(maxlen=_UTILISATION_WINDOW)  # (end, ns)
        self._utilisation = 1.0  # assume slot-bound until measured

    # --- observations -----------------------------------------------------------------------

    def record_arrival(self, items: int, now_ns: int, outstanding: int = 0) -> None:
        """`outstanding`: items already queued or executing when this one arrived."""
        self._peak = max(self._peak - 1 / _PEAK_DECAY, float(outstanding + items))
        if self._last_arrival_ns:
            gap = now_ns - self._last_arrival_ns
            if self._mean_gap_ns:
                self._mean_gap_ns += _ARRIVAL_ALPHA * (gap - self._mean_gap_ns)
            else:
                self._mean_gap_ns = float(max(gap, 1))
            self._mean_items += _ARRIVAL_ALPHA * (items - self._mean_items)
        else:
            self._mean_items = float(items)
        self._overlap += _ARRIVAL_ALPHA * ((1.0 if outstanding else 0.0) - self._overlap)
        self._last_arrival_ns = now_ns

    def record_execution(self, items: int, duration_ns: int, end_ns: int = 0) -> None:
        if items < 1:
            return
        with self._lock:
            mean, n = self._by_size.get(items, (0.0, 0))
            n += 1
            alpha = max(1.0 / n, _EXEC_ALPHA)
            mean += alpha * (duration_ns - mean)
            self._by_size[items] = (mean, n)
            self._fit = _fit_affine(self._by_size)
            if end_ns:
                recent = self._recent
                if recent and end_ns - duration_ns - recent[-1][0] > _PAUSE_NS:
                    recent.clear()
                recent.append((end_ns, duration_ns))
                self._utilisation = _utilisation(self._recent, self._slots)

    # --- decisions --------------------------------------------------------------------------

    def host_bound(self) -> bool:
        """Requests arrive concurrently while the slots are mostly idle."""
        return self._utilisation < BUSY and self._overlap >= OVERLAP

    def _cap(self, fit: tuple[float, float]) -> float:
        if self._cap_ns:
            return self._cap_ns
        a, c = fit
        return a + c * self._max_preferred

    def expired(self, oldest_ns: int, now_ns: int) -> bool:
        fit = self._fit
        if fit is None:
            return False
        return now_ns - oldest_ns >= self._cap(fit)

    def send_by(self, queued: int, oldest_ns: int, now_ns: int) -> int:
        fit = self._fit
        if fit is None or not self._mean_gap_ns or queued < 1:
            return now_ns
        cap_at = oldest_ns + self._cap(fit)
        if self.host_bound():
            # Waiting is free for the bottleneck: wait while arrivals keep coming, unless every
            # item lately seen in flight is already here.
            if queued >= int(self._peak):
                return now_ns
            return int(min(self._last_arrival_ns + SILENCE * self._mean_gap_ns, cap_at))
        a = fit[0]
        since_last = now_ns - self._last_arrival_ns
        gap = max(self._mean_gap_ns, float(since_last), 1.0)
        items_per_fixed_cost = a * self._mean_items / gap
        if queued >= items_per_fixed_cost:
            return now_ns
        # Keep waiting until silence alone makes the rate too low: since_last >= a*m/queued.
        silence_limit = self._last_arrival_ns + a * self._mean_items / queued
        return int(min(silence_limit, cap_at))


def _utilisation(recent: deque[tuple[int, int]], slots: int) -> float:
    """Busy share of the slots between the first recorded execution's start and the last end."""
    if len(recent) < 8:
        return 1.0
    start = recent[0][0] - recent[0][1]
    span = recent[-1][0] - start
    if span <= 0:
        return 1.0
    return min(1.0, sum(d for _, d in recent) / (span * slots))


def _fit_affine(by_size: dict[int, tuple[float, int]]) -> tuple[float, float] | None:
    """Weighted least squares of time = a + c*size; None with fewer than two sizes."""
    if len(by_size) < 2:
        return None
    sw = sx = sy = sxx = sxy = 0.0
    for size, (mean, n) in by_size.items():
        w = float(min(n, _MAX_WEIGHT))
        sw += w
        sx += w * size
        sy += w * mean
        sxx += w * size * size
        sxy += w * size * mean
    denom = sw * sxx - sx * sx
    if denom <= 0:
        return None
    c = (sw * sxy - sx * sy) / denom
    a = (sy - c * sx) / sw
    if c < 0:  # noise: time fell with size; treat the cost as all fixed
        c, a = 0.0, sy / sw
    # What every execution pays cannot exceed the cheapest execution seen: noisy or stale timings
    # of large batches must not make a lone request wait for company.
    cheapest = min(mean for mean, _ in by_size.values())
    return min(max(a, 0.0), cheapest), c
