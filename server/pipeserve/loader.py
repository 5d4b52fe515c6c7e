"""Turn a model folder into ready-to-serve versions: config, graph checks, sessions.

Synchronous and slow (onnxruntime session creation holds the GIL for a while): the registry calls
`load_model_folder` through `asyncio.to_thread`. Every failure is a ModelLoadError with the reason.

config.pbtxt is read once into a frozen `ModelSettings` (spec, batching policy, instance plan,
pipeline plan, onnxruntime settings, known parameters); everything below reads that object. The
completed protobuf message rides along only for the ModelConfig RPC.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pipeserve import parameters as table
from pipeserve.batching.base import ModelRunner
from pipeserve.batching.factory import batching_policy
from pipeserve.batching.policy import BatchingPolicy
from pipeserve.classification import read_labels
from pipeserve.errors import NOT_POLLED, ConfigError, ModelLoadError
from pipeserve.inference import ModelSpec
from pipeserve.progress import LoadProgress
from pipeserve.repository.config import (
    ModelConfig,
    accelerators,
    complete_config,
    instance_groups,
    model_spec,
    read_config,
    select_versions,
    string_parameters,
    validate_config,
)
from pipeserve.repository.graph import GraphIO, model_file, read_graph_io
from pipeserve.repository.scan import version_folders
from pipeserve.repository.sections import check_sections
from pipeserve.runtime.instances import InstancePlan, create_instances, plan_instances
from pipeserve.runtime.pipeline.config import PipelineConfig, parse_pipeline_config
from pipeserve.runtime.pipeline.executor import StageCallback, pipeline_runner
from pipeserve.runtime.reshape import with_reshapes
from pipeserve.runtime.sessions import Accelerator, OrtSettings, ort_settings
from pipeserve.runtime.warmup import run_warmup, warmup_samples

log = logging.getLogger(__name__)

# Called with a version number before that version's runner is built; returns where its
# pipeline stage timings go (None: nowhere). The registry binds the version's recorder here.
StageSinkFor = Callable[[int], StageCallback | None]


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """A model's settings, read once from its completed config."""

    name: str
    spec: ModelSpec  # version 0; `spec_for` gives each version's
    # Dynamic batching policy; None = one request per execution (Triton's default scheduler).
    batching: BatchingPolicy | None
    instances: InstancePlan
    pipeline: PipelineConfig | None  # None: plain instances
    ort: OrtSettings
    parameters: Mapping[str, str]  # every key, known or not (read-only)
    # The completed message: what the ModelConfig RPC returns. Nothing below the API reads it.
    config: ModelConfig

    def spec_for(self, version: int) -> ModelSpec:
        return dataclasses.replace(self.spec, version=version)


def read_model_settings(
    config: ModelConfig,
    labels: Mapping[str, tuple[str, ...]] | None = None,
    graph: GraphIO | None = None,
) -> ModelSettings:
    """Validate a completed config's sections and parameters into ModelSettings. Raises
    ConfigError before any session exists; WARNS about unknown parameter keys. `labels`: each
    output's classification labels (read from its label_filename); `graph`: the newest
    version's (model_spec)."""
    name = config.name
    parameters = string_parameters(config)
    table.validate(parameters)
    for key, nearest in table.unknown_keys(parameters):
        log.warning(
            "model '%s': unknown parameter '%s' is ignored%s",
            name,
            key,
            f" (did you mean '{nearest}'?)" if nearest else "",
        )
    ort = ort_settings(
        parameters,
        config.optimization.graph.level,
        [Accelerator(kind, n, p) for kind, n, p in accelerators(config)],  # type: ignore[arg-type]
        what=f"model '{name}'",
    )
    spec = model_spec(config, 0, labels, graph)
    return ModelSettings(
        name=name,
        spec=spec,
        batching=batching_policy(config, spec),
        instances=plan_instances(instance_groups(config), parameters, name, ort),
        pipeline=parse_pipeline_config(parameters),
        ort=ort,
        parameters=MappingProxyType(parameters),
        config=config,
    )


@dataclass(slots=True)
class LoadedVersion:
    version: int
    path: Path
    spec: ModelSpec
    runner: ModelRunner
    load_seconds: float
    # Device of each pipeline stage; empty when the version runs as plain instances.
    stage_devices: tuple[str, ...] = ()


@dataclass(slots=True)
class LoadedModel:
    settings: ModelSettings
    versions: dict[int, LoadedVersion]

    @property
    def config(self) -> ModelConfig:
        return self.settings.config

    def close(self) -> None:
        for v in self.versions.values():
            v.runner.close()


def load_model_folder(
    name: str,
    folder: Path,
    override: ModelConfig | None = None,
    stage_sink_for: StageSinkFor | None = None,
) -> LoadedModel:
    """Read, complete and validate the config, then create sessions for every selected version.

    `override` replaces config.pbtxt (RepositoryModelLoad's `config` parameter). On failure
    nothing stays loaded.
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
    selected_by_raw_policy = select_versions(given, sorted(found), name)
    newest = max(selected_by_raw_policy)
    graph = read_graph_io(found[newest])
    config = complete_config(given, name, graph)
    validate_config(config, graph)
    versions_to_load = select_versions(config, sorted(found), name)
    labels = {
        o.name: read_labels(folder, o.label_filename, o.name)
        for o in config.output
        if o.label_filename
    }
    settings = read_model_settings(config, labels, graph)  # a bad section fails before any session
    # Built (and checked against the model) once: every version has the same config.
    samples = warmup_samples(config, settings.spec_for(newest), folder)
    loaded: dict[int, LoadedVersion] = {}
    try:
        for version in versions_to_load:
            path = found[version]
            if version != newest:
                validate_config(config, read_graph_io(path))
            start = time.monotonic()
            spec = settings.spec_for(version)
            progress = LoadProgress(name, version, log)
            progress.announce(_model_bytes(model_file(path)))
            runner: ModelRunner
            stage_devices: tuple[str, ...] = ()
            if settings.pipeline is not None:
                # The version's recorder is bound already: stages report into it from the first
                # micro-batch on (warm-up included: those ran on the stages too).
                sink = stage_sink_for(version) if stage_sink_for is not None else None
                pipeline = pipeline_runner(
                    model_file(path),
                    settings.pipeline,
                    spec,
                    on_stage=sink,
                    settings=settings.ort,
                    progress=progress,
                )
                runner, stage_devices = pipeline, tuple(pipeline.devices)
            else:
                runner = create_instances(model_file(path), settings.instances, name, progress)
            runner = with_reshapes(runner, spec)
            try:
                run_warmup(runner, samples, spec.output_names(), name)  # before READY
            except BaseException:
                runner.close()
                raise
            loaded[version] = LoadedVersion(
                version, path, spec, runner, time.monotonic() - start, stage_devices
            )
    except BaseException:
        for v in loaded.values():
            v.runner.close()
        raise
    return LoadedModel(settings, loaded)


def _model_bytes(graph: Path) -> int:
    """Bytes of the files beside the graph (itself, external weights, a pack's weights.bin)."""
    return sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())


def check_name(name: str) -> None:
    """A model name must be one folder of the repository: never a path that leads out of it
    (a load request's name comes from the client). Triton's words where it has them."""
    if not name.strip():
        raise ConfigError("Model name cannot be empty. Please enter a valid name to deploy.")
    if "/" in name or "\\" in name or "\0" in name or name.strip() in (".", ".."):
        raise ConfigError(
            f"invalid model name {name!r}: model name must not contain path traversal "
            "characters (a model is one folder of the repository)"
        )
    if name.startswith("."):  # a name, not a path: as Triton, it is just not found
        raise ModelLoadError(
            f"failed to load '{name}', {NOT_POLLED}: a name starting with '.' is a hidden "
            "folder, which the repository never serves"
        )
