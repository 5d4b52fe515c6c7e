"""The host's CPU utilisation and memory, read from /proc at scrape time, under Triton's names
(`nv_cpu_utilization`, `nv_cpu_memory_total_bytes`, `nv_cpu_memory_used_bytes`: Triton's Grafana
dashboards plot them).

As in Triton these are the machine's figures (/proc/stat, /proc/meminfo), not the process's (the
process collector's `process_*` series are those) nor a container's limits. Utilisation is the
share of CPU time not idle since the previous sample: a sample is taken at a scrape when the last
one is at least MIN_SAMPLE_S old, so scrapers close together see the same value rather than the
noise of a few milliseconds. Where /proc is not readable (not Linux), there is no collector and no
`nv_cpu_*` series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

MIN_SAMPLE_S = 1.0
_STAT = Path("/proc/stat")
_MEMINFO = Path("/proc/meminfo")


def cpu_times(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's text: idle and iowait are not busy;
    guest time is already counted in user and nice, so it is left out of the total."""
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("/proc/stat does not start with the 'cpu' line")
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def memory_bytes(meminfo: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo's text: used is MemTotal less MemAvailable."""
    kib: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            kib[key] = int(rest.split()[0])
    total = kib["MemTotal"] * 1024
    return total, total - kib.get("MemAvailable", kib["MemTotal"]) * 1024


class CpuCollector:
    """A prometheus_client collector of the three `nv_cpu_*` gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes render on worker threads
        self._last = cpu_times(_STAT.read_text())
        self._at = time.monotonic()
        self._utilization = 0.0

    @classmethod
    def open(cls) -> CpuCollector | None:
        """A collector, or None where /proc cannot be read or parsed."""
        try:
            collector = cls()
            memory_bytes(_MEMINFO.read_text())
        except (OSError, ValueError, KeyError, IndexError):
            return None
        return collector

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        utilization, total, used = _families()
        try:
            rate = self._sample()
            memory_total, memory_used = memory_bytes(_MEMINFO.read_text())
        except (OSError, ValueError, KeyError, IndexError):
            return iter(())  # /proc went away: the scrape goes on without these
        utilization.add_metric([], rate)
        total.add_metric([], float(memory_total))
        used.add_metric([], float(memory_used))
        return iter((utilization, total, used))

    def _sample(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= MIN_SAMPLE_S:
                busy, total = cpu_times(_STAT.read_text())
                last_busy, last_total = self._last
                if total > last_total:
                    self._utilization = min(
                        max((busy - last_busy) / (total - last_total), 0.0), 1.0
                    )
                self._last, self._at = (busy, total), now
            return self._utilization


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]"),
        GaugeMetricFamily("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes"),
        GaugeMetricFamily("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes"),
    )
