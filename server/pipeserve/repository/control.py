"""Model control modes: what gets loaded, when.

- none:     load every model folder at start; the load/unload RPCs are refused.
- explicit: load only `--load-model` names at start ("*" = all); load/unload RPCs do the rest.
- poll:     load all at start, then rescan every N seconds: a new folder loads, a removed folder
            unloads, a changed folder reloads (the old version serves until the new one is
            ready; a failed reload keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeserve.errors import NOT_POLLED, ModelLoadError, UnavailableError
from pipeserve.loader import check_name
from pipeserve.registry import IndexEntry, ModelState, Registry
from pipeserve.repository.config import ModelConfig
from pipeserve.repository.scan import ModelFolder, scan_repository
from pipeserve.settings import CONTROL_MODES

log = logging.getLogger(__name__)


class ModelControl:
    def __init__(
        self,
        registry: Registry,
        repository: Path,
        mode: str,
        poll_seconds: float,
        startup_models: Sequence[str] = (),
    ) -> None:
        if mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}, got '{mode}'")
        self._registry = registry
        self._repository = repository
        self._mode = mode
        self._poll_seconds = poll_seconds
        self._startup = tuple(startup_models)
        # What was on disk when each served model was last (re)loaded from the folder.
        self._seen: dict[str, ModelFolder] = {}
        self._poll_task: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        return self._mode

    async def start(self) -> None:
        """Initial loads. Failures are logged and shown in the index; the server still starts."""
        folders = scan_repository(self._repository)
        if self._mode == "explicit":
            names = list(folders) if "*" in self._startup else list(self._startup)
        else:
            names = list(folders)
        await asyncio.gather(*(self._load_folder(n, folders.get(n)) for n in names))
        if self._mode == "poll":
            self._poll_task = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None

    async def load(
        self,
        name: str,
        override: ModelConfig | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """RepositoryModelLoad (explicit mode only). A failure is the client's: logged at
        WARNING with the reason, answered with it."""
        self.require_explicit()
        check_name(name)  # before the name touches the file system
        if not files and not (self._repository / name).is_dir():
            reason = f"no model folder '{name}' in the model repository"
            log.warning("failed to poll model '%s': %s", name, reason)
            raise ModelLoadError(f"failed to load '{name}', {NOT_POLLED}: {reason}")
        await self._registry.load(name, override, files, failure_level=logging.WARNING)

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload (explicit mode only). Unloading a model that is not loaded
        succeeds, as in Triton."""
        self.require_explicit()
        await self._registry.unload(name)

    def index(self, ready_only: bool) -> list[IndexEntry]:
        folders = {name: f.path for name, f in scan_repository(self._repository).items()}
        entries = self._registry.index(folders)
        if ready_only:
            entries = [e for e in entries if e.state is ModelState.READY]
        return entries

    def require_explicit(self) -> None:
        """Raise UnavailableError unless load/unload requests are allowed (explicit mode)."""
        if self._mode != "explicit":
            # Triton's status and words (it says "polling" for its mode none as well).
            raise UnavailableError(
                f"explicit model load / unload is not allowed if polling is enabled: the server "
                f"runs in model control mode '{self._mode}'; start it with "
                f"--model-control-mode explicit"
            )

    async def _load_folder(self, name: str, folder: ModelFolder | None) -> None:
        try:
            await self._registry.load(name)
        except ModelLoadError:
            pass  # logged by the registry and shown as UNAVAILABLE in the index
        finally:
            if folder is not None:
                self._seen[name] = folder

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # a scan must never kill the poller
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        folders = await asyncio.to_thread(scan_repository, self._repository)
        work = []
        for name, folder in folders.items():
            seen = self._seen.get(name)
            if seen is None or seen.fingerprint != folder.fingerprint:
                log.info(
                    "repository: %s model '%s'", "loading" if seen is None else "reloading", name
                )
                work.append(self._load_folder(name, folder))
        for name in list(self._seen):
            if name not in folders:
                log.info("repository: model folder '%s' removed, unloading", name)
                work.append(self._unload_removed(name))
        await asyncio.gather(*work)

    async def _unload_removed(self, name: str) -> None:
        self._seen.pop(name, None)
        try:
            await self._registry.unload(name)
        finally:
            self._registry.forget(name)
