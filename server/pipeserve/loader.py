"""Turn a model folder into ready-to-serve versions: config, graph checks, sessions.

Synchronous and slow (onnxruntime session creation holds the GIL for a while): the registry calls
`load_model_folder` through `asyncio.to_thread`. Every failure is a ModelLoadError with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeserve.api.generated import model_config_pb2 as mc
from pipeserve.batching.base import ModelRunner
from pipeserve.batching.factory import batching_policy
from pipeserve.batching.policy import BatchingPolicy
from pipeserve.errors import ConfigError, ModelLoadError
from pipeserve.inference import ModelSpec
from pipeserve.repository.config import (
    ModelConfig,
    complete_config,
    model_spec,
    read_config,
    select_versions,
    validate_config,
)
from pipeserve.repository.graph import model_file, read_graph_io
from pipeserve.repository.scan import version_folders
from pipeserve.repository.sections import check_sections
from pipeserve.runtime.instances import create_instances, plan_instances
from pipeserve.runtime.pipeline.executor import create_pipeline_runner
from pipeserve.runtime.warmup import run_warmup, warmup_samples


class StageSink:
    """Forwards pipeline stage timings to the recorder the registry binds when it serves the
    version (metrics are bound after the sessions exist). Called from stage threads."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: Callable[[int, str, int, int], None] | None = None

    def __call__(self, stage: int, device: str, compute_ns: int, transfer_ns: int) -> None:
        target = self.target
        if target is not None:
            target(stage, device, compute_ns, transfer_ns)


@dataclass(slots=True)
class LoadedVersion:
    version: int
    path: Path
    spec: ModelSpec
    runner: ModelRunner
    load_seconds: float
    stage_sink: StageSink
    # Dynamic batching policy; None = one request per execution (Triton's default scheduler).
    batching: BatchingPolicy | None
    # Device of each pipeline stage; empty when the version runs as plain instances.
    stage_devices: tuple[str, ...] = ()


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    versions: dict[int, LoadedVersion]

    def close(self) -> None:
        for v in self.versions.values():
            v.runner.close()


def load_model_folder(name: str, folder: Path, override: ModelConfig | None = None) -> LoadedModel:
    """Read, complete and validate the config, then create sessions for every selected version.

    `override` replaces config.pbtxt (RepositoryModelLoad's `config` parameter).
    On failure nothing stays loaded.
    """
    if not folder.is_dir():
        raise ModelLoadError(f"model folder '{folder}' does not exist")
    given = override if override is not None else read_config(folder)
    check_sections(given, name)  # what pipeserve does not implement is refused, never skipped
    filename = given.default_model_filename or "model.onnx"
    found = version_folders(folder, filename)
    if not found:
        raise ModelLoadError(
            f"model '{name}': no version folder (a number, e.g. '1/') holding '{filename}' in "
            f"'{folder}'"
        )
    # Triton completes one config per model, from the newest version's graph.
    selected_by_raw_policy = select_versions(given, sorted(found))
    newest = max(selected_by_raw_policy)
    graph = read_graph_io(found[newest])
    config = complete_config(given, name, graph)
    validate_config(config, graph)
    versions_to_load = select_versions(config, sorted(found))
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    plan = plan_instances(
        [
            (mc.ModelInstanceGroup.Kind.Name(g.kind).removeprefix("KIND_"), g.count, list(g.gpus))
            for g in config.instance_group
        ],
        parameters,
    )
    # Built (and checked against the model) once: every version has the same config.
    samples = warmup_samples(config, model_spec(config, newest), folder)
    loaded: dict[int, LoadedVersion] = {}
    try:
        for version in versions_to_load:
            path = found[version]
            if version != newest:
                validate_config(config, read_graph_io(path))
            start = time.monotonic()
            spec = model_spec(config, version)
            batching = batching_policy(config, spec)  # a bad section fails before any session
            sink = StageSink()
            # A model with pipeline parameters runs as stages; any other as plain instances.
            pipeline = create_pipeline_runner(model_file(path), parameters, spec, on_stage=sink)
            runner: ModelRunner = pipeline or create_instances(model_file(path), plan, name)
            stage_devices = tuple(pipeline.devices) if pipeline is not None else ()
            try:
                run_warmup(runner, samples, spec.output_names(), name)  # before READY
            except BaseException:
                runner.close()
                raise
            loaded[version] = LoadedVersion(
                version, path, spec, runner, time.monotonic() - start, sink, batching, stage_devices
            )
    except BaseException:
        for v in loaded.values():
            v.runner.close()
        raise
    return LoadedModel(config, loaded)


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid model name '{name}'")
