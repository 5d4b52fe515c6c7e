"""Choose a model's scheduler from its config, in two steps: the policy is read (and refused
with ConfigError) at load, before any session exists; the scheduler is built when the version
starts serving."""

from __future__ import annotations

from typing import Any

from pipeserve.batching.base import ModelRunner, Scheduler
from pipeserve.batching.direct import DirectScheduler
from pipeserve.batching.dynamic import DynamicBatcher
from pipeserve.batching.policy import BatchingPolicy
from pipeserve.inference import ModelSpec
from pipeserve.observers import InferenceObserver


def batching_policy(config: Any, spec: ModelSpec) -> BatchingPolicy | None:
    """The dynamic batching policy of a completed inference.ModelConfig, or None when it has no
    `dynamic_batching` (Triton's default scheduler). Raises ConfigError for an invalid section."""
    if config.HasField("dynamic_batching"):
        return BatchingPolicy.from_config(config, spec)
    return None


def create_scheduler(
    policy: BatchingPolicy | None, spec: ModelSpec, runner: ModelRunner, observer: InferenceObserver
) -> Scheduler:
    """DynamicBatcher for a batching policy, else DirectScheduler. Starts the worker threads."""
    if policy is not None:
        return DynamicBatcher(spec, runner, observer, policy)
    return DirectScheduler(spec, runner, observer)
