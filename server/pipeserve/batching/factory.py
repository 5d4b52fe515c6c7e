"""Choose a model's scheduler from its config."""

from __future__ import annotations

from typing import Any

from pipeserve.batching.base import ModelRunner, Scheduler
from pipeserve.batching.direct import DirectScheduler
from pipeserve.inference import ModelSpec
from pipeserve.observers import InferenceObserver


def create_scheduler(
    config: Any, spec: ModelSpec, runner: ModelRunner, observer: InferenceObserver
) -> Scheduler:
    """`config` is the completed inference.ModelConfig message of the model version."""
    return DirectScheduler(spec, runner, observer)
