"""progress.py: plain lines when the output is not a terminal, log lines for slow loads."""

from __future__ import annotations

import io
import logging

import pytest

from pipeserve.progress import PLAIN_AFTER_SECS, LoadProgress, PhaseProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_phase_prints_a_line_per_tenth_then_done() -> None:
    out, clock = io.StringIO(), Clock()
    with PhaseProgress("pipeserve pack", stream=out, clock=clock) as progress:
        for done in range(0, 101, 5):
            clock.now += PLAIN_AFTER_SECS  # every update comes after the quiet start
            progress("weights", done << 20, 100 << 20, "B")
    lines = out.getvalue().splitlines()
    assert lines[0] == "pipeserve pack: weights: 10% (10.0 MiB of 100.0 MiB), 2.0 s"
    assert [line.split(": ")[2].split(" ")[0] for line in lines[:-1]] == [
        f"{p}%" for p in range(10, 100, 10)
    ]
    assert lines[-1] == "pipeserve pack: weights: done (100.0 MiB of 100.0 MiB), 20.0 s"


def test_a_quick_phase_prints_only_done_and_phases_follow_in_order() -> None:
    out = io.StringIO()
    with PhaseProgress("pipeserve split", stream=out, clock=Clock()) as progress:
        for step in range(5):
            progress("planning", step, 4 if step < 4 else 4, "step")
        progress("writing", 1, 1, "tensor")
    assert out.getvalue().splitlines() == [
        "pipeserve split: planning: done (4 of 4 steps), 0.0 s",
        "pipeserve split: writing: done (1 of 1 tensor), 0.0 s",
    ]


def test_a_failed_phase_does_not_claim_done() -> None:
    out = io.StringIO()
    with (
        pytest.raises(RuntimeError),
        PhaseProgress("pipeserve pack", stream=out, clock=Clock()) as progress,
    ):
        progress("weights", 10, 100, "B")
        raise RuntimeError("disk full")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with PhaseProgress("pipeserve pack", stream=out, clock=Clock()) as progress:
        progress("weights", 50, 100, "B")
        progress("weights", 100, 100, "B")
    drawn = out.getvalue()
    assert "\r" in drawn and "100%" in drawn and "pipeserve pack: weights" in drawn
    assert "done (" not in drawn


def test_load_progress_is_quiet_for_quick_loads_then_logs_each_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = logging.getLogger("test_progress")
    progress = LoadProgress("big", 2, log, after_secs=3.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test_progress"):
        clock.now += 1.0
        progress.step("instance", 1, 3, "on cpu")
        clock.now += 4.5
        progress.step("instance", 2, 3, "on cpu")
        clock.now += 2.0
        progress.step("instance", 3, 3, "on cuda:0")
    assert caplog.messages == [
        "model 'big' v2: instance 2 of 3 built on cpu, 5.5 s into the load",
        "model 'big' v2: instance 3 of 3 built on cuda:0, 7.5 s into the load",
    ]


def test_load_progress_announces_only_big_loads(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test_progress")
    progress = LoadProgress("big", 1, log, clock=Clock())
    with caplog.at_level(logging.INFO, logger="test_progress"):
        progress.announce(5 << 20, large_bytes=1 << 30)
        progress.announce(3 << 30, large_bytes=1 << 30)
    assert caplog.messages == ["model 'big' v1: loading 3.0 GiB of model files"]
