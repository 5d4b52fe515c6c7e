"""Server settings: typed, validated at start-up, frozen. Flags win over PIPESERVE_* env vars,
which win over defaults; a bad value fails before anything is served."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeserve.repository.control import CONTROL_MODES

# gRPC's own ceiling for one message (clients allow up to 2 GiB).
MAX_MESSAGE_LIMIT = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# asyncio: pipeserve's own HTTP/2 transport (api/h2); grpcio: grpc.aio, the reference one.
GRPC_FRONTENDS = ("asyncio", "grpcio")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Settings:
    model_repository: Path = Path("models")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    metrics: bool = True
    model_control_mode: str = "none"
    repository_poll_secs: float = 5.0
    load_models: tuple[str, ...] = field(default_factory=tuple)
    log_level: str = "INFO"
    max_message_bytes: int = MAX_MESSAGE_LIMIT
    exit_timeout_secs: float = 30.0
    grpc_frontend: str = "asyncio"

    def __post_init__(self) -> None:
        if not self.model_repository.is_dir():
            raise SettingsError(f"model repository '{self.model_repository}' is not a directory")
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SettingsError(f"{name.replace('_', '-')} must be 0..65535, got {port}")
        if self.model_control_mode not in CONTROL_MODES:
            raise SettingsError(
                f"model-control-mode must be one of {', '.join(CONTROL_MODES)}, "
                f"got '{self.model_control_mode}'"
            )
        if self.repository_poll_secs <= 0:
            raise SettingsError(
                f"repository-poll-secs must be > 0, got {self.repository_poll_secs}"
            )
        if self.load_models and self.model_control_mode != "explicit":
            raise SettingsError("--load-model needs --model-control-mode explicit")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"log-level must be one of {', '.join(LOG_LEVELS)}")
        if not 1024 <= self.max_message_bytes <= MAX_MESSAGE_LIMIT:
            raise SettingsError(
                f"max-message-bytes must be 1024..{MAX_MESSAGE_LIMIT}, got {self.max_message_bytes}"
            )
        if self.grpc_frontend not in GRPC_FRONTENDS:
            raise SettingsError(
                f"grpc-frontend must be one of {', '.join(GRPC_FRONTENDS)}, "
                f"got '{self.grpc_frontend}'"
            )
        if self.exit_timeout_secs < 0:
            raise SettingsError(f"exit-timeout-secs must be >= 0, got {self.exit_timeout_secs}")


def env_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """PIPESERVE_GRPC_PORT=8001 -> {"grpc_port": "8001"} for every known setting."""
    environ = os.environ if environ is None else environ
    # Every flag of `pipeserve serve` (NO_METRICS is read by the CLI as a boolean).
    names = (set(Settings.__dataclass_fields__) - {"metrics", "load_models"}) | {"load_model"}
    out: dict[str, str] = {}
    for name in names:
        value = environ.get("PIPESERVE_" + name.upper())
        if value is not None:
            out[name] = value
    return out
