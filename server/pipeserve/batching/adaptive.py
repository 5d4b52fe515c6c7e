"""The adaptive batching delay (opt-in: `parameters { key: "batching_mode" value: { string_value:
"adaptive" } }`): instead of one fixed max_queue_delay, each wait is chosen from the observed
arrival rate and the observed execution time per batch size.

Model. Executing a batch of b items costs T(b) ~= a + c*b: `a` is what every execution pays once
(reading the weights, dispatch, kernel launches), `c` what each item adds; both are fitted by least
squares over the average time per executed batch size. Items arrive at rate L. Sending the S queued
items now costs (a + c*S) / S per item; waiting until S' items are queued costs
((S' - S) / L + a + c*S') / S'. For every S' > S the second is smaller exactly when S < a*L: while
fewer items are queued than arrive during one fixed cost, waiting lowers the cost per item (and so
raises the throughput the slot can sustain); once that many are queued, waiting only adds latency.

Consequences:
- One closed-loop client has L ~= 1 / (a + c + round trip), so a*L < 1 and nothing ever waits.
- Under load a*L grows and batches fill until the fixed cost is amortised; the forming rules still
  cut at preferred sizes and max_batch_size.
- Silence counts: L is computed from max(mean gap, time since the last arrival), so when arrivals
  stop the wait ends a*m/S after the last one (m = mean items per request).
- A wait never exceeds `cap` from the oldest queued request: max_queue_delay_microseconds when the
  config sets it, else the estimated time of one execution at the largest preferred size.
- Until executions of two different batch sizes have been timed nothing waits (delay 0), which is
  also how the sizes get observed: with delay 0 a busy model forms batches of varied sizes.

Threading: `record_arrival` and `send_by`/`expired` are called with the batcher's lock held;
`record_execution` from worker threads after a batch, under this object's own lock. The fitted
(a, c) pair is published as one tuple, so readers never see half an update.
"""

from __future__ import annotations

import threading

# Smoothing for the arrival gap and items-per-request averages (about the last 16 requests).
_ARRIVAL_ALPHA = 1 / 16
# Smoothing for per-size execution times once a size has a few samples.
_EXEC_ALPHA = 1 / 8
# A size's weight in the fit saturates here, so one very common size cannot mask the others.
_MAX_WEIGHT = 32


class AdaptiveDelay:
    def __init__(self, max_preferred: int, cap_ns: int = 0) -> None:
        self._max_preferred = max_preferred
        self._cap_ns = cap_ns  # 0: derived from the fitted cost model
        self._last_arrival_ns = 0
        self._mean_gap_ns = 0.0
        self._mean_items = 1.0
        self._lock = threading.Lock()
        self._by_size: dict[int, tuple[float, int]] = {}  # size -> (mean ns, samples)
        self._fit: tuple[float, float] | None = None  # (a ns, c ns per item)

    # --- observations -----------------------------------------------------------------------

    def record_arrival(self, items: int, now_ns: int) -> None:
        if self._last_arrival_ns:
            gap = now_ns - self._last_arrival_ns
            if self._mean_gap_ns:
                self._mean_gap_ns += _ARRIVAL_ALPHA * (gap - self._mean_gap_ns)
            else:
                self._mean_gap_ns = float(max(gap, 1))
            self._mean_items += _ARRIVAL_ALPHA * (items - self._mean_items)
        else:
            self._mean_items = float(items)
        self._last_arrival_ns = now_ns

    def record_execution(self, items: int, duration_ns: int) -> None:
        if items < 1:
            return
        with self._lock:
            mean, n = self._by_size.get(items, (0.0, 0))
            n += 1
            alpha = max(1.0 / n, _EXEC_ALPHA)
            mean += alpha * (duration_ns - mean)
            self._by_size[items] = (mean, n)
            self._fit = _fit_affine(self._by_size)

    # --- decisions --------------------------------------------------------------------------

    def fixed_cost_ns(self) -> float | None:
        """The fitted per-execution cost `a`, None until two batch sizes were timed."""
        fit = self._fit
        return None if fit is None else fit[0]

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
        a = fit[0]
        since_last = now_ns - self._last_arrival_ns
        gap = max(self._mean_gap_ns, float(since_last), 1.0)
        items_per_fixed_cost = a * self._mean_items / gap
        if queued >= items_per_fixed_cost:
            return now_ns
        # Keep waiting until silence alone makes the rate too low: since_last >= a*m/queued.
        silence_limit = self._last_arrival_ns + a * self._mean_items / queued
        return int(min(silence_limit, oldest_ns + self._cap(fit)))


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
