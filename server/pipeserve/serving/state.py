"""Liveness and readiness of the whole server, shared by every front end and the health service.

Runs on the event loop. `changed` is replaced on every change, so a waiter wakes once per change.
"""

from __future__ import annotations

import asyncio


class ServerState:
    def __init__(self) -> None:
        self.live = True
        self.ready = False
        self.draining = False
        self.changed = asyncio.Event()

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.changed.set()
        self.changed = asyncio.Event()

    def start_draining(self) -> None:
        """Not ready any more, for good: open health watches say so and end."""
        self.draining = True
        self.set_ready(False)
