"""Pipeline settings from a model config's `parameters` (string values), validated at load.

    pipeline_devices            "cpu,cpu" or "cuda:0,cuda:1" (one entry per stage; a single
                                entry is repeated for every stage)
    pipeline_stages             number of stages (default: number of devices)
    micro_batch_size            rows per micro-batch (default: batch / stages, rounded up)
    pipeline_cuts               "t1,t2": tensors after whose producers the graph is cut
                                (stages - 1 names; default: chosen by the partitioner)
    pipeline_threads_per_stage  intra-op threads of each CPU stage (default: the session cores,
                                all but one, split between the CPU stages)
    pipeline_in_flight          batches in the pipeline at once (default: stages)
    pipeline_cost               auto | profile | estimate: how node costs are obtained

A model is pipelined when `pipeline_devices`, `pipeline_stages` or `pipeline_cuts` is present.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pipeserve import parameters as table
from pipeserve.errors import ConfigError
from pipeserve.runtime.devices import Device, split_cores

PIPELINE_KEYS = ("pipeline_devices", "pipeline_stages", "pipeline_cuts")
ALL_KEYS = (
    *PIPELINE_KEYS,
    "micro_batch_size",
    "pipeline_threads_per_stage",
    "pipeline_in_flight",
    "pipeline_cost",
)
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    devices: tuple[Device, ...]  # one per stage
    micro_batch_size: int | None
    cuts: tuple[str, ...] | None
    threads_per_stage: int  # of each CPU stage
    in_flight: int
    cost: Literal["auto", "profile", "estimate"]
    # pipeline_threads_per_stage was given (else the split follows the stages' placement).
    threads_given: bool = False

    @property
    def stages(self) -> int:
        return len(self.devices)


def parse_device(text: str) -> Device:
    match = _DEVICE.match(text.strip().lower())
    if not match:
        raise ConfigError(
            f"unknown device '{text.strip()}' in pipeline_devices: expected 'cpu' or 'cuda:N'"
        )
    kind = match.group(1)
    if kind == "cpu":
        if match.group(2) not in (None, "0"):
            raise ConfigError(
                f"unknown device '{text.strip()}' in pipeline_devices: CPU stages are written "
                f"'cpu' (each gets its own thread budget)"
            )
        return Device("cpu")
    return Device("cuda", int(match.group(2) or 0))


def parse_pipeline_config(
    parameters: Mapping[str, str], cpu_count: int | None = None
) -> PipelineConfig | None:
    """The pipeline settings, or None when the model is not pipelined. Raises ConfigError naming
    the parameter and what was expected."""
    if not any(parameters.get(key, "").strip() for key in PIPELINE_KEYS):
        stray = [k for k in ALL_KEYS if parameters.get(k, "").strip()]
        if stray:
            raise ConfigError(
                f"parameter '{stray[0]}' needs a pipeline: set pipeline_devices or "
                f"pipeline_stages too"
            )
        return None
    stages = _positive_int(parameters, "pipeline_stages")
    cuts = _names(parameters.get("pipeline_cuts", ""))
    devices_text = parameters.get("pipeline_devices", "").strip()
    if devices_text:
        devices = tuple(parse_device(d) for d in devices_text.split(","))
    else:
        devices = (Device("cpu"),)
    if stages is None:
        stages = len(cuts) + 1 if cuts else len(devices)
    if len(devices) == 1:
        devices = devices * stages
    elif len(devices) != stages:
        raise ConfigError(
            f"pipeline_stages is {stages} but pipeline_devices lists {len(devices)} devices: "
            f"give one device per stage, or a single device for all"
        )
    if cuts is not None and len(cuts) != stages - 1:
        raise ConfigError(
            f"pipeline_cuts names {len(cuts)} tensor(s) but {stages} stages need "
            f"{stages - 1} cut(s)"
        )
    cpu_stages = sum(1 for d in devices if d.kind == "cpu")
    given = _positive_int(parameters, "pipeline_threads_per_stage")
    threads = given or split_cores(cpu_stages, cpu_count)
    in_flight = _positive_int(parameters, "pipeline_in_flight") or stages
    cost = table.read(parameters, "pipeline_cost", "auto")
    return PipelineConfig(
        devices=devices,
        micro_batch_size=_positive_int(parameters, "micro_batch_size"),
        cuts=cuts,
        threads_per_stage=threads,
        in_flight=in_flight,
        cost=cost,  # type: ignore[arg-type]
        threads_given=given is not None,
    )


def _positive_int(parameters: Mapping[str, str], key: str) -> int | None:
    value: int | None = table.read(parameters, key)
    return value


def _names(raw: str) -> tuple[str, ...] | None:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    return names or None
