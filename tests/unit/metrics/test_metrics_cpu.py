"""The host CPU and memory series (metrics/cpu.py): /proc's text parsed, utilisation taken
between samples at least MIN_SAMPLE_S apart, the real /proc read on this machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeserve.metrics import cpu
from pipeserve.metrics.cpu import CpuCollector, cpu_times, memory_bytes

STAT = "cpu  100 5 50 800 20 3 2 0 7 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1\n"
MEMINFO = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n"


def test_cpu_times_count_idle_and_iowait_as_idle_and_leave_guest_out() -> None:
    busy, total = cpu_times(STAT)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 0
    assert busy == total - 800 - 20


def test_memory_used_is_total_less_available() -> None:
    assert memory_bytes(MEMINFO) == (1000 * 1024, 400 * 1024)


@pytest.mark.parametrize("bad", ["", "intr 1\n", "cpu x y\n"])
def test_a_stat_that_does_not_parse_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        cpu_times(bad)


def test_utilization_is_the_busy_share_between_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat, meminfo = tmp_path / "stat", tmp_path / "meminfo"
    stat.write_text("cpu  100 0 0 100 0 0 0 0\n")
    meminfo.write_text(MEMINFO)
    monkeypatch.setattr(cpu, "_STAT", stat)
    monkeypatch.setattr(cpu, "_MEMINFO", meminfo)
    clock = [1000.0]
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock[0])
    collector = CpuCollector.open()
    assert collector is not None
    registry = CollectorRegistry()
    registry.register(collector)

    def utilization() -> float:
        value = registry.get_sample_value("nv_cpu_utilization")
        assert value is not None
        return value

    stat.write_text("cpu  175 0 0 125 0 0 0 0\n")  # 75 of the next 100 jiffies busy
    clock[0] += 2
    assert utilization() == 0.75
    stat.write_text("cpu  175 0 0 225 0 0 0 0\n")
    clock[0] += 0.5  # too soon for a new sample: the same value
    assert utilization() == 0.75
    clock[0] += 1
    assert utilization() == 0.0
    assert registry.get_sample_value("nv_cpu_memory_used_bytes") == 400 * 1024


def test_no_proc_means_no_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_STAT", tmp_path / "missing")
    assert CpuCollector.open() is None


def test_the_real_proc_gives_sane_values() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc here")
    collector = CpuCollector.open()
    assert collector is not None
    registry = CollectorRegistry()
    registry.register(collector)
    time.sleep(cpu.MIN_SAMPLE_S)
    text = generate_latest(registry).decode()
    assert "# TYPE nv_cpu_utilization gauge" in text
    value = registry.get_sample_value("nv_cpu_utilization")
    assert value is not None and 0.0 <= value <= 1.0
    total = registry.get_sample_value("nv_cpu_memory_total_bytes")
    used = registry.get_sample_value("nv_cpu_memory_used_bytes")
    assert total is not None and used is not None and 0 < used < total
