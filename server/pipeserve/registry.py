"""Name/version -> served model, and the lifecycle LOADING / READY / UNLOADING / UNAVAILABLE.

Runs on the event loop. Callers look up and submit in one synchronous step (`lookup`, then
`ServedVersion.submit`, with no await between), and a reload
swaps a model's version table in one assignment before closing the old schedulers; so a request
either reaches the old version (which drains everything it accepted) or the new one, never a
closed scheduler. Loads of one model are serialised by a per-model lock.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeserve.batching.base import Scheduler
from pipeserve.batching.factory import create_scheduler
from pipeserve.errors import (
    NOT_POLLED,
    InvalidInputError,
    LoadFailedError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    PipeserveError,
)
from pipeserve.inference import InferRequest, ModelSpec
from pipeserve.loader import LoadedModel, StageSinkFor, check_name, load_model_folder
from pipeserve.observers import InferenceObserver
from pipeserve.repository.config import ModelConfig
from pipeserve.statistics import ModelStats, StatsSnapshot

log = logging.getLogger(__name__)


# The reason an UNAVAILABLE model gives when it was unloaded on purpose (Triton's word too).
UNLOADED = "unloaded"

# Request forms whose validation a served version keeps (ServedVersion.submit's `checked_as`):
# emptied when full, it refills from the forms in use.
_CHECKED_MAX = 1024


def parse_version(version: str) -> int | None:
    """A request's model version: "" = the newest (None), else a number >= 0. Triton's text for
    anything else."""
    if not version:
        return None
    try:
        number = int(version)
    except ValueError:
        raise InvalidInputError(
            f"failed to get model version from specified version string '{version}' "
            f"(details: not an integer), version should be an integral value > 0"
        ) from None
    if number < 0:
        raise InvalidInputError(
            f"invalid model version specified '{version}' , version should be an integral value > 0"
        )
    return number


class ModelState(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class VersionRecorder(InferenceObserver, Protocol):
    """A version's one recorder: what the scheduler reports into, what ModelStatistics reads."""

    def statistics(self) -> StatsSnapshot: ...


class ModelRecorder(VersionRecorder, Protocol):
    """The recorder with metrics on (metrics.recorder.ModelMetrics)."""

    def stage_done(self, stage: int, device: str, compute_ns: int, transfer_ns: int) -> None: ...

    def bind_stages(self, stages: Iterable[tuple[int, str]]) -> object: ...


class MetricsBinder(Protocol):
    """What the registry needs from metrics (pipeserve.metrics.recorder.ServerMetrics)."""

    def bind_model(self, name: str, version: int) -> ModelRecorder: ...

    def unbind_model(self, name: str, version: int) -> None: ...

    def observe_load(self, name: str, version: int, seconds: float) -> None: ...

    def bound(self) -> list[tuple[str, int]]: ...


@dataclass(slots=True, eq=False)
class ServedVersion:
    name: str
    version: int
    config: ModelConfig
    spec: ModelSpec
    scheduler: Scheduler
    stats: VersionRecorder
    observer: InferenceObserver  # the same object as `stats`
    # Batch sizes of the request forms that validated, by their `checked_as` key (submit).
    _checked: dict[Hashable, int] = field(default_factory=dict, repr=False)

    def submit(
        self, request: InferRequest, checked_as: Hashable | None = None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Validate and queue a request. Raises PipeserveError at once when it cannot be
        accepted, recording the failure in this version's statistics. Call it in the same
        synchronous step as the lookup that returned this version (see the module docstring).

        `checked_as`: a key the caller gives only to requests whose input names, datatypes and
        shapes and outputs asked for are all the same (the kept heads of api/request_wire.py and
        api/http/binary_heads.py): such a form is validated once, its batch size kept
        (bounded)."""
        try:
            if checked_as is None:
                self.spec.validate(request)
            else:
                batch_size = self._checked.get(checked_as)
                if batch_size is None:
                    self.spec.validate(request)
                    if len(self._checked) >= _CHECKED_MAX:
                        self._checked.clear()
                    self._checked[checked_as] = request.batch_size
                else:
                    request.batch_size = batch_size
            return self.scheduler.submit(request)
        except PipeserveError as exc:
            self.observer.request_failed(exc.reason, time.monotonic_ns() - request.arrival_ns)
            raise


@dataclass(slots=True)
class IndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str


@dataclass(slots=True, eq=False)
class _Model:
    name: str
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = "not loaded"
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    config: ModelConfig | None = None
    loaded: LoadedModel | None = None
    # Folder made for a load that carried its own files (explicit mode); removed at unload.
    temp_dir: Path | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Registry:
    def __init__(
        self,
        repository: Path,
        metrics: MetricsBinder | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change` is called (on the event loop) after any model changes state: server
        readiness depends on it (ServerState, strict readiness)."""
        self._repository = repository
        self._metrics = metrics
        self._on_change = on_change or (lambda: None)
        self._models: dict[str, _Model] = {}

    # ---- request path (event loop, synchronous) ---------------------------------------------

    def lookup(self, name: str, version: str = "") -> ServedVersion:
        number = parse_version(version)
        model = self._models.get(name)
        if model is None or not model.versions:
            if model is not None and model.state in (ModelState.LOADING, ModelState.UNLOADING):
                raise ModelNotReadyError(f"model '{name}' is {model.state.value.lower()}")
            raise ModelNotFoundError.for_model(name, version)
        if number is None:
            return model.versions[max(model.versions)]
        served = model.versions.get(number)
        if served is None:
            raise ModelNotFoundError.for_model(name, version)
        return served

    def is_ready(self, name: str, version: str = "") -> bool:
        """Raises InvalidInputError for a version that is not a number (Triton does too)."""
        parse_version(version)
        try:
            self.lookup(name, version)
        except PipeserveError:
            return False
        return self._models[name].state is ModelState.READY

    def all_ready(self) -> bool:
        """Every model the server was asked to serve is READY (Triton's strict readiness: a model
        unloaded on purpose does not count, one that failed or is loading does)."""
        return all(
            m.state is ModelState.READY
            or (m.state is ModelState.UNAVAILABLE and m.reason == UNLOADED)
            for m in self._models.values()
        )

    def failures(self) -> dict[str, str]:
        """name -> reason of every model that is UNAVAILABLE for a reason other than unloading."""
        return {
            m.name: m.reason
            for m in self._models.values()
            if m.state is ModelState.UNAVAILABLE and m.reason != UNLOADED
        }

    def ready_names(self) -> list[str]:
        return sorted(m.name for m in self._models.values() if m.state is ModelState.READY)

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def served_versions(self, name: str) -> list[ServedVersion]:
        model = self._models.get(name)
        return [model.versions[v] for v in sorted(model.versions)] if model else []

    def index(self, scanned: Mapping[str, Path] | None = None) -> list[IndexEntry]:
        """Every known model (and every folder in `scanned` not loaded yet) with its state."""
        out: list[IndexEntry] = []
        names = set(self._models) | set(scanned or ())
        for name in sorted(names):
            model = self._models.get(name)
            if model is None:
                out.append(IndexEntry(name, "", ModelState.UNAVAILABLE, "not loaded"))
                continue
            if model.versions and model.state is ModelState.READY:
                # reason: empty, or why the last reload failed while these versions serve on.
                out.extend(
                    IndexEntry(name, str(v), ModelState.READY, model.reason)
                    for v in sorted(model.versions)
                )
            else:
                version = str(max(model.versions)) if model.versions else ""
                out.append(IndexEntry(name, version, model.state, model.reason))
        return out

    # ---- lifecycle (event loop, awaits) ------------------------------------------------------

    async def load(
        self,
        name: str,
        override: ModelConfig | None = None,
        files: Mapping[str, bytes] | None = None,
        failure_level: int = logging.ERROR,
    ) -> None:
        """Load or reload `name` from the repository (or from `files`). A failed reload keeps the
        versions already serving (its reason shows in the index); a failed first load leaves the
        model UNAVAILABLE with the reason. A failure is logged at `failure_level` (a load a
        client asked for is the client's problem: WARNING). Raises LoadFailedError."""
        check_name(name)
        model = self._models.setdefault(name, _Model(name))
        async with model.lock:
            folder = self._repository / name
            temp_dir = None
            if files:
                if override is None:
                    raise InvalidInputError(
                        f"load of '{name}' with file contents needs a 'config' parameter too"
                    )
                temp_dir = await asyncio.to_thread(_write_files, name, files)
                folder = temp_dir / name
            if not model.versions:
                model.state = ModelState.LOADING
                model.reason = ""
                self._on_change()
            start = time.monotonic()
            try:
                loaded = await asyncio.to_thread(
                    load_model_folder, name, folder, override, self._stage_sink_for(name)
                )
            except Exception as exc:  # whatever failed, the model must not stay LOADING
                self._unbind_unserved(name, model)
                if isinstance(exc, PipeserveError):
                    reason = _without_model_prefix(name, exc.message)
                else:
                    reason = f"unexpected error: {exc!r}"
                    log.exception("unexpected error while loading model '%s'", name)
                if temp_dir is not None:
                    shutil.rmtree(temp_dir, ignore_errors=True)
                if model.versions:
                    # Still READY; the reason stays in the index until a load succeeds.
                    model.state = ModelState.READY
                    model.reason = f"reload failed, version {max(model.versions)} serves: {reason}"
                    log.log(
                        failure_level,
                        "reload of model '%s' failed, old version keeps serving: %s",
                        name,
                        reason,
                    )
                else:
                    model.state = ModelState.UNAVAILABLE
                    model.reason = reason
                    log.log(failure_level, "failed to load model '%s': %s", name, reason)
                self._on_change()
                raise LoadFailedError(f"load failed for model '{name}': {reason}") from None
            seconds = time.monotonic() - start
            new_versions = {v: self._serve(name, loaded, v) for v in loaded.versions}
            old_versions, old_loaded, old_temp = model.versions, model.loaded, model.temp_dir
            # The swap: from here on every lookup sees the new versions.
            model.versions = new_versions
            model.config, model.loaded, model.temp_dir = loaded.config, loaded, temp_dir
            model.state, model.reason = ModelState.READY, ""
            self._on_change()
            for v in new_versions:
                if self._metrics is not None:
                    self._metrics.observe_load(name, v, seconds)
            log.info("model '%s' ready: versions %s (%.2fs)", name, sorted(new_versions), seconds)
            await self._retire(name, old_versions, old_loaded, old_temp, keep=set(new_versions))

    async def unload(self, name: str) -> None:
        """Stop serving `name`; requests already accepted complete first."""
        model = self._models.get(name)
        if model is None:
            # Triton answers success: there is nothing to unload.
            log.info("unload of model '%s': not loaded, nothing to do", name)
            return
        async with model.lock:
            old_versions, old_loaded, old_temp = model.versions, model.loaded, model.temp_dir
            model.state, model.reason = ModelState.UNLOADING, ""
            model.versions = {}
            model.loaded, model.temp_dir = None, None
            self._on_change()
            await self._retire(name, old_versions, old_loaded, old_temp, keep=set())
            model.state, model.reason = ModelState.UNAVAILABLE, UNLOADED
            model.config = None
            self._on_change()
            log.info("model '%s' unloaded", name)

    def forget(self, name: str) -> None:
        """Drop an unloaded model from the index (its folder was removed)."""
        model = self._models.get(name)
        if model is not None and not model.versions and not model.lock.locked():
            del self._models[name]
            self._on_change()

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(n) for n in list(self._models)), return_exceptions=True)

    def _stage_sink_for(self, name: str) -> StageSinkFor | None:
        """For the loader: bind version's recorder before its runner exists, so pipeline stages
        get their metrics sink at construction. Runs on the loader's thread (bind_model locks)."""
        metrics = self._metrics
        if metrics is None:
            return None
        return lambda version: metrics.bind_model(name, version).stage_done

    def _unbind_unserved(self, name: str, model: _Model) -> None:
        """After a failed load: drop the recorders it bound for versions nobody serves."""
        if self._metrics is None:
            return
        for bound_name, version in self._metrics.bound():
            if bound_name == name and version not in model.versions:
                self._metrics.unbind_model(name, version)

    def _serve(self, name: str, loaded: LoadedModel, version: int) -> ServedVersion:
        lv = loaded.versions[version]
        # One recorder per version: ModelStatistics and Prometheus read the same counts.
        recorder: VersionRecorder
        if self._metrics is not None:
            # Bound already when the load asked for its stage sink (the same recorder).
            metrics = self._metrics.bind_model(name, version)
            metrics.bind_stages(enumerate(lv.stage_devices))  # stage series exist from load
            recorder = metrics
        else:
            recorder = ModelStats()
        scheduler = create_scheduler(loaded.settings.batching, lv.spec, lv.runner, recorder)
        return ServedVersion(name, version, loaded.config, lv.spec, scheduler, recorder, recorder)

    async def _retire(
        self,
        name: str,
        versions: dict[int, ServedVersion],
        loaded: LoadedModel | None,
        temp_dir: Path | None,
        keep: set[int],
    ) -> None:
        """Drain the schedulers of replaced versions, then free their sessions."""
        await asyncio.gather(*(v.scheduler.close() for v in versions.values()))
        if loaded is not None:
            await asyncio.to_thread(loaded.close)
        if self._metrics is not None:
            for v in versions:
                if v not in keep:
                    self._metrics.unbind_model(name, v)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _write_files(name: str, files: Mapping[str, bytes]) -> Path:
    """Lay out RepositoryModelLoad `file:<relative path>` contents as `<tmp>/<name>/<path>`."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pipeserve-load-"))
    try:
        for relative, content in files.items():
            _write_file(name, root / name, relative, content)
    except PipeserveError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _write_file(name: str, model_dir: Path, relative: str, content: bytes) -> None:
    try:
        target = (model_dir / relative).resolve()
        if not target.is_relative_to(model_dir.resolve()):
            raise InvalidInputError(f"file path '{relative}' leaves the model folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    except OSError as exc:  # a name too long, a full disk: as Triton, the load never starts
        shown = relative if len(relative) <= 64 else relative[:64] + "..."
        reason = f"could not write 'file:{shown}' ({exc.strerror or exc})"
        log.warning("failed to load model '%s': %s", name, reason)
        raise ModelLoadError(f"failed to load '{name}', {NOT_POLLED}: {reason}") from None


def _without_model_prefix(name: str, reason: str) -> str:
    """Errors from config checks start with "model '<name>': " so they read alone; every line
    the registry makes of them (log, index reason, load error) names the model already."""
    prefix = f"model '{name}': "
    return reason.removeprefix(prefix)
