"""Choose a model's scheduler from its config."""

from __future__ import annotations

from typing import Any

from pipeserve.batching.base import ModelRunner, Scheduler
from pipeserve.batching.direct import DirectScheduler
from pipeserve.batching.dynamic import DynamicBatcher
from pipeserve.batching.policy import BatchingPolicy
from pipeserve.inference import ModelSpec
from pipeserve.observers import InferenceObserver


def create_scheduler(
    config: Any, spec: ModelSpec, runner: ModelRunner, observer: InferenceObserver
) -> Scheduler:
    """`config` is the completed inference.ModelConfig message of the model version.

    DynamicBatcher when `dynamic_batching` is set, else DirectScheduler (Triton's default
    scheduler). Raises ConfigError for an invalid dynamic_batching section, before any worker
    thread starts.
    """
    if config.HasField("dynamic_batching"):
        return DynamicBatcher(spec, runner, observer, BatchingPolicy.from_config(config, spec))
    return DirectScheduler(spec, runner, observer)
