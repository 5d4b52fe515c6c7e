"""Liveness and readiness of the whole server, shared by every front end and the health service.

Runs on the event loop. `changed` is replaced on every change, so a waiter wakes once per change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ServerState:
    def __init__(self, models_ready: Callable[[], bool] | None = None) -> None:
        """`models_ready`: with strict readiness, whether every model that should be loaded is
        READY (the server is ready only then); None: readiness is the server's alone."""
        self.live = True
        self.draining = False
        self.changed = asyncio.Event()
        self._up = False
        self._models_ready = models_ready

    @property
    def ready(self) -> bool:
        return self._up and (self._models_ready is None or self._models_ready())

    def set_ready(self, ready: bool) -> None:
        self._up = ready
        self.notify()

    def notify(self) -> None:
        """Something readiness depends on changed (a model's state): wake the watchers."""
        self.changed.set()
        self.changed = asyncio.Event()

    def start_draining(self) -> None:
        """Not ready any more, for good: open health watches say so and end."""
        self.draining = True
        self.set_ready(False)
