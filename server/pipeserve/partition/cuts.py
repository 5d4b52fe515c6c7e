"""Where to cut a sequence of compute nodes into contiguous stages.

First the smallest achievable bottleneck (the cost of the most expensive stage) is found; then,
among the cuts whose every stage stays within `slack` of it, the one that sends the fewest bytes
across cuts wins. A dynamic programme over cut positions with a sliding-window minimum keeps this
O(stages x nodes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pipeserve.errors import ConfigError

INF = float("inf")


def min_bottleneck(costs: Sequence[float], stages: int) -> float:
    """The smallest possible cost of the heaviest stage (linear partition, binary search)."""
    low = max(costs, default=0.0)
    high = sum(costs)
    if stages <= 1 or high == 0:
        return high
    for _ in range(60):
        mid = (low + high) / 2
        if _stages_needed(costs, mid) <= stages:
            high = mid
        else:
            low = mid
        if high - low <= high * 1e-9:
            break
    return high


def _stages_needed(costs: Sequence[float], limit: float) -> int:
    count, current = 1, 0.0
    for cost in costs:
        if current + cost > limit:
            count += 1
            current = cost
        else:
            current += cost
    return count


def choose_cuts(
    costs: Sequence[float], crossing: Sequence[float], stages: int, slack: float = 0.1
) -> list[int]:
    """Cut positions (1..n-1, increasing; position j cuts before node j) for `stages` stages.

    costs[i]: cost of node i. crossing[j]: bytes that cross a cut at position j (crossing[0]
    unused). Every stage gets at least one node.
    """
    n = len(costs)
    if stages < 1:
        raise ConfigError(f"pipeline needs at least 1 stage, got {stages}")
    if stages > n:
        raise ConfigError(
            f"cannot split {n} compute nodes into {stages} stages: at most {n} stages"
        )
    if stages == 1:
        return []
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    limit = min_bottleneck(costs, stages) * (1 + slack) + 1e-12
    # best[j]: least crossing bytes to place nodes [0, j) into k stages, last stage ending at j.
    best = [INF] * (n + 1)
    for j in range(1, n + 1):
        if prefix[j] <= limit:
            best[j] = 0.0
    back: list[list[int]] = [[0] * (n + 1)]
    for _ in range(2, stages + 1):
        nxt = [INF] * (n + 1)
        choice = [0] * (n + 1)
        window: deque[int] = deque()  # candidate previous cut positions, increasing score
        lo = 0
        j_next = 1
        for i in range(1, n + 1):
            # Previous cut j < i may enter the window once j <= i - 1.
            while j_next <= i - 1:
                score = best[j_next] + crossing[j_next]
                while window and best[window[-1]] + crossing[window[-1]] >= score:
                    window.pop()
                window.append(j_next)
                j_next += 1
            # A previous cut j is usable while the stage (j, i] stays within the limit.
            while lo < i and prefix[i] - prefix[lo] > limit:
                lo += 1
            while window and window[0] < lo:
                window.popleft()
            if window:
                j = window[0]
                value = best[j] + crossing[j]
                if value < INF:
                    nxt[i] = value
                    choice[i] = j
        back.append(choice)
        best = nxt
    if best[n] == INF:  # cannot happen when stages <= n, kept as a guard for float rounding
        raise ConfigError(f"no balanced split of {n} compute nodes into {stages} stages found")
    cuts: list[int] = []
    position = n
    for k in range(stages - 1, 0, -1):
        position = back[k][position]
        cuts.append(position)
    return sorted(cuts)
