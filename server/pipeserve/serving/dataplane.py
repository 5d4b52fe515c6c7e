"""DataPlane: what a request asks of the server, whichever protocol carried it.

Look up a model, validate and submit a request, the response-size policy, metadata, statistics,
the repository index and load/unload with their parameters. Front ends (api/grpc_service.py,
api/http/) only decode their wire format into these calls and encode the answers; every error is
a `PipeserveError`, mapped to a status once per protocol (api/status.py for gRPC).

Runs on the event loop. Inference is two steps so that a front end can decode between them:
`lookup` first (an unknown model is reported as such even when the tensors are malformed too, as
Triton does), then `infer`, which validates and queues synchronously before its first await: no
reload can slip in between the lookup and the submit (see registry.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeserve import __version__
from pipeserve.classification import check_requested, classify
from pipeserve.errors import (
    NOT_POLLED,
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    PipeserveError,
    ResponseTooLargeError,
    UnsupportedError,
)
from pipeserve.inference import InferRequest, InferResponse
from pipeserve.registry import IndexEntry, Registry, ServedVersion
from pipeserve.repository.config import ModelConfig, parse_config_json
from pipeserve.repository.control import ModelControl
from pipeserve.serving.state import ServerState
from pipeserve.statistics import StatsSnapshot

log = logging.getLogger(__name__)

# Only what is really implemented: perf_analyzer asks for statistics because it is listed.
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
    "classification",
    # A request's `priority` and `timeout` parameters, and dynamic_batching's priority levels and
    # queue policies (batching/policy.py), as Triton's extension of that name.
    "schedule_policy",
)

# A load parameter's value, as the protocols carry it (gRPC's ModelRepositoryParameter oneof;
# HTTP's JSON, with `file:` contents base64-decoded by the front end).
LoadParameter = str | bytes | bool | int


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with -1 for the batch dimension when the model batches


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    name: str
    version: str
    stats: StatsSnapshot


def _load_parameters(
    parameters: Mapping[str, LoadParameter | None],
) -> tuple[ModelConfig | None, dict[str, bytes]]:
    override = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            if not isinstance(value, str):
                raise ConfigError("load parameter 'config' must be a string (JSON)")
            override = parse_config_json(value)
        elif key.startswith("file:"):
            if not isinstance(value, bytes):
                raise InvalidInputError(f"load parameter '{key}' must carry bytes")
            files[key.removeprefix("file:")] = value
        else:
            raise InvalidInputError(
                f"unknown load parameter '{key}', expected 'config' or 'file:<path>'"
            )
    return override, files


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        control: ModelControl,
        state: ServerState,
        max_message_bytes: int,
        server_name: str = "pipeserve",
    ) -> None:
        self._registry = registry
        self._control = control
        self._state = state
        self._max_message_bytes = max_message_bytes
        self._metadata = ServerMetadata(server_name, __version__, EXTENSIONS)

    # ---- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return self._state.live

    def ready(self) -> bool:
        return self._state.ready

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._registry.is_ready(name, version)

    def server_metadata(self) -> ServerMetadata:
        return self._metadata

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        served = self._registry.lookup(name, version)
        spec = served.spec
        batch = (-1,) if spec.batching else ()
        return ModelMetadata(
            name=spec.name,
            versions=tuple(str(v.version) for v in self._registry.served_versions(spec.name)),
            platform=served.config.platform,
            inputs=tuple(TensorMetadata(t.name, t.datatype, batch + t.dims) for t in spec.inputs),
            outputs=tuple(TensorMetadata(t.name, t.datatype, batch + t.dims) for t in spec.outputs),
        )

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        """The completed config (auto-complete applied) of a served version."""
        return self._registry.lookup(name, version).config

    def statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        """One model version, every version of one model, or (no name) every served version."""
        if name:
            if version:
                versions = [self._registry.lookup(name, version)]
            else:
                versions = self._registry.served_versions(name)
                if not versions:
                    raise ModelNotFoundError.for_model(name)
        else:
            versions = [
                v
                for model in self._registry.model_names()
                for v in self._registry.served_versions(model)
            ]
        return [VersionStatistics(v.name, str(v.version), v.stats.statistics()) for v in versions]

    # ---- inference ----------------------------------------------------------------------------

    def lookup(self, name: str, version: str = "") -> ServedVersion:
        return self._registry.lookup(name, version)

    async def infer(
        self, served: ServedVersion, request: InferRequest, checked_as: Hashable | None = None
    ) -> InferResponse:
        """Validate and queue `request` on `served` (synchronously: call it right after `lookup`,
        with no await between), then wait for its outputs. `checked_as`: see
        ServedVersion.submit."""
        outputs = await self.submit(served, request, checked_as)
        return self.respond(served, request, outputs)

    def submit(
        self, served: ServedVersion, request: InferRequest, checked_as: Hashable | None = None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """`infer`'s first half, for callers that wait without a coroutine: validate and queue
        now (raises PipeserveError when refused), the future holds the outputs; hand them to
        `respond`. Cancelling the future drops a request that has not run yet. `checked_as`:
        see ServedVersion.submit."""
        if request.classification:
            declared = {o.name: o.datatype for o in served.spec.outputs}
            check_requested(request.classification, declared, served.name)
        return served.submit(request, checked_as)

    def respond(
        self, served: ServedVersion, request: InferRequest, outputs: dict[str, np.ndarray]
    ) -> InferResponse:
        """`infer`'s second half: the response to `request` from its outputs."""
        if request.classification:
            outputs = self._classified(served, request.classification, outputs)
        return InferResponse(
            model_name=served.name,
            model_version=str(served.version),
            request_id=request.request_id,
            outputs=outputs,
        )

    @staticmethod
    def _classified(
        served: ServedVersion, classification: Mapping[str, int], outputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Replace each output asked for as classes by its top-N "value:index:label" strings."""
        labels = {o.name: o.labels for o in served.spec.outputs}
        batching = served.spec.batching
        return {
            name: classify(array, classification[name], labels.get(name, ()), batching)
            if name in classification
            else array
            for name, array in outputs.items()
        }

    def check_response_size(self, served: ServedVersion, nbytes: int) -> None:
        """The server's one response-size policy (--max-message-bytes), for every protocol:
        refused with the reason rather than cut off by the transport."""
        if nbytes > self._max_message_bytes:
            raise ResponseTooLargeError(
                f"response of model '{served.name}' is {nbytes} bytes, over the server's "
                f"--max-message-bytes limit of {self._max_message_bytes}"
            )

    # ---- repository ---------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        return self._control.index(ready_only=ready_only)

    async def load(
        self, name: str, parameters: Mapping[str, LoadParameter | None] | None = None
    ) -> None:
        """Load or reload `name` (explicit mode). `parameters`: `config` (a JSON ModelConfig
        that replaces the folder's config.pbtxt) and `file:<path>` (bytes of a file laid out in
        the model folder; needs `config`).

        As in Triton, the control mode is checked first, and parameters that cannot be used
        (a malformed `config`, an unknown key) fail the load before it starts: INTERNAL
        "failed to load '<name>', failed to poll from model repository", here followed by the
        reason, which is logged at WARNING too."""
        self._control.require_explicit()
        try:
            override, files = _load_parameters(parameters or {})
        except PipeserveError as exc:
            log.warning("failed to load model '%s': refused load parameters: %s", name, exc)
            raise ModelLoadError(f"failed to load '{name}', {NOT_POLLED}: {exc.message}") from None
        await self._control.load(name, override, files)

    async def unload(self, name: str) -> None:
        await self._control.unload(name)

    @staticmethod
    def check_repository(name: str) -> None:
        """pipeserve serves one repository: a request naming one must leave it empty."""
        if name:
            raise InvalidInputError(
                f"unknown repository '{name}': pipeserve serves one repository (leave it empty)"
            )

    @staticmethod
    def unsupported(what: str) -> None:
        raise UnsupportedError(f"{what} is not supported by pipeserve")
