"""Progress of long work: bars or plain lines for the offline tools, log lines for slow loads.

The tools (`pipeserve pack`, `pipeserve split`) report through `PhaseProgress`, a callback
`(phase, done, total, unit)` their library functions call: on a terminal each phase draws a tqdm
bar; anywhere else (CI logs, pipes, files) it prints a plain line per tenth of the work, so the
output stays readable and grep-able (quick phases print one "done" line). The server reports
through `LoadProgress`: silent for quick loads, a log line per instance or stage once a load has
run longer than LOAD_LOG_AFTER_SECS.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

# (phase, done, total, unit): `done` of `total` units of `phase` are finished. Library code
# calls it; None means nobody is watching.
ProgressCallback = Callable[[str, int, int, str], None]

# Loads quicker than this log only their usual "ready" line.
LOAD_LOG_AFTER_SECS = 3.0
# A version whose model files are this big says when its load begins.
LARGE_MODEL_BYTES = 1 << 30
# Plain (non-terminal) output prints a line each time another tenth of a phase is done, once
# the phase has run for PLAIN_AFTER_SECS (quick phases print only their "done" line).
PLAIN_LINES = 10
PLAIN_AFTER_SECS = 1.0


class PhaseProgress:
    """A ProgressCallback that draws one bar per phase on a terminal, else plain lines.

    `prefix` starts every plain line (e.g. "pipeserve pack"). Call `close()` at the end (or use
    it as a context manager): it finishes the last phase. Not thread-safe: one caller.
    """

    def __init__(
        self,
        prefix: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._stream = stream if stream is not None else sys.stderr
        self._terminal = bool(getattr(self._stream, "isatty", lambda: False)())
        self._clock = clock
        self._phase: str | None = None
        self._bar: tqdm | None = None
        self._started = 0.0
        self._next_line = 1
        self._done = 0
        self._total = 0
        self._unit = ""

    def __call__(self, phase: str, done: int, total: int, unit: str) -> None:
        if phase != self._phase:
            self._finish()
            self._start(phase, total, unit)
        self._total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._done)
        elif (
            total > 0
            and done < total
            and done * PLAIN_LINES >= self._next_line * total  # integers: no rounding
            and self._clock() - self._started >= PLAIN_AFTER_SECS
        ):
            self._line(done)
            self._next_line = done * PLAIN_LINES // total + 1
        self._done = done

    def close(self, failed: bool = False) -> None:
        """Finish the last phase; `failed`: it did not complete (no "done" line, bar left as is)."""
        self._finish(failed)

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(failed=exc_type is not None)

    def _start(self, phase: str, total: int, unit: str) -> None:
        self._phase, self._done, self._total, self._unit = phase, 0, total, unit
        self._started = self._clock()
        self._next_line = 1  # in tenths of the phase's total
        if self._terminal:
            binary = unit == "B"
            self._bar = tqdm(
                total=total,
                desc=f"{self._prefix}: {phase}",
                unit=unit,
                unit_scale=binary,
                unit_divisor=1024 if binary else 1000,
                file=self._stream,
                leave=True,
                dynamic_ncols=True,
            )

    def _finish(self, failed: bool = False) -> None:
        if self._phase is None:
            return
        if self._bar is not None:
            if not failed:
                self._bar.update(max(0, self._total - self._done))
            self._bar.close()
            self._bar = None
        elif not failed:
            self._line(self._total, finished=True)
        self._phase = None

    def _line(self, done: int, finished: bool = False) -> None:
        elapsed = self._clock() - self._started
        share = f"{done / self._total:.0%}" if self._total else "100%"
        if self._unit == "B":
            amount = f"{format_bytes(done)} of {format_bytes(self._total)}"
        else:
            amount = f"{done} of {self._total} {self._unit}{'' if self._total == 1 else 's'}"
        state = "done" if finished else share
        print(
            f"{self._prefix}: {self._phase}: {state} ({amount}), {elapsed:.1f} s",
            file=self._stream,
            flush=True,
        )


def format_bytes(n: float) -> str:
    """`n` bytes for people: "512 B", "1.5 KiB", ... "3.0 GiB"."""
    value = float(n)
    for name in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or name == "GiB":
            return f"{value:.0f} {name}" if name == "B" else f"{value:.1f} {name}"
        value /= 1024
    return f"{value:.1f} GiB"


class LoadProgress:
    """Logs the steps of one model version's load once it has run for `after_secs`.

    Quick loads stay quiet (the registry logs their "ready" line with the duration); a slow one
    gets a line per instance or stage built, with the time since the load began, so an operator
    watching a multi-GB model load sees it advance. Called from the loading thread only.
    """

    def __init__(
        self,
        model: str,
        version: int,
        log: logging.Logger,
        after_secs: float = LOAD_LOG_AFTER_SECS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._version = version
        self._log = log
        self._after = after_secs
        self._clock = clock
        self._started = clock()

    def announce(self, model_bytes: int, large_bytes: int = LARGE_MODEL_BYTES) -> None:
        """Log the start of a big load (its per-step lines follow), so an operator knows why
        READY takes a while; smaller loads stay quiet."""
        if model_bytes >= large_bytes:
            self._log.info(
                "model '%s' v%d: loading %s of model files",
                self._model,
                self._version,
                format_bytes(model_bytes),
            )

    def step(self, what: str, done: int, total: int, detail: str) -> None:
        """`done` of `total` `what`s (instances, stages) are built; `detail` e.g. "on cpu"."""
        elapsed = self._clock() - self._started
        if elapsed >= self._after:
            self._log.info(
                "model '%s' v%d: %s %d of %d built %s, %.1f s into the load",
                self._model,
                self._version,
                what,
                done,
                total,
                detail,
                elapsed,
            )
