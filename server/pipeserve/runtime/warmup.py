"""`model_warmup`: run a model version on synthetic or file inputs before it is READY, as Triton
does (core's TritonModelInstance::GenerateWarmupData / WarmUp).

Triton's semantics, kept:
- one sample per `model_warmup` entry; `batch_size: 0` skips the sample; `count` runs it that many
  times, at least once;
- the sample is `batch_size` requests of one item each (`[1] + dims` for a batching model),
  executed together: for a batching model one batch of `batch_size`, otherwise `batch_size`
  executions of `dims`;
- `zero_data` (zeros; empty strings for TYPE_STRING), `random_data` (random bytes; for
  TYPE_STRING zeros, as Triton does; BOOL gets random 0/1 rather than raw bytes) or
  `input_data_file` (raw little-endian bytes read from `<model>/warmup/<file>`; the first bytes
  one request needs are used, for TYPE_STRING the whole file is one request's serialized
  elements: 4-byte little-endian length + data each);
- every dimension given (no -1);
- every execution slot (instance) is warmed up, and any failure fails the load with the reason.

A sample is checked against the model like a request (`ModelSpec.validate`), so a wrong name,
datatype, shape or batch size fails at load naming the sample and the input.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeserve.api.generated import model_config_pb2 as mc
from pipeserve.batching.base import ModelRunner
from pipeserve.errors import ConfigError, ModelLoadError, PipeserveError
from pipeserve.inference import InferRequest, ModelSpec
from pipeserve.repository.config import ModelConfig
from pipeserve.tensors import deserialize_bytes, element_size, numpy_dtype, triton_from_config_type

log = logging.getLogger(__name__)

# Triton's kWarmupDataFolder: `input_data_file` names are relative to <model folder>/warmup/.
WARMUP_FOLDER = "warmup"


@dataclass(frozen=True, slots=True)
class WarmupSample:
    name: str
    count: int  # iterations, >= 1
    # What one iteration executes: one batch (batching model) or batch_size single requests.
    executions: tuple[dict[str, np.ndarray], ...]


def warmup_samples(
    config: ModelConfig, spec: ModelSpec, model_dir: Path, seed: int | None = None
) -> list[WarmupSample]:
    """Build and check every sample of `config.model_warmup`. Raises ConfigError."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, warmup in enumerate(config.model_warmup):
        label = warmup.name or f"#{i}"
        if warmup.batch_size == 0:
            log.debug("model '%s': skipping warm-up sample '%s' (batch_size 0)", spec.name, label)
            continue
        try:
            samples.append(_sample(warmup, label, spec, model_dir, rng))
        except PipeserveError as exc:
            raise ConfigError(
                f"model '{spec.name}': model_warmup '{label}': {exc.message}"
            ) from None
    return samples


def _sample(
    warmup: mc.ModelWarmup, label: str, spec: ModelSpec, model_dir: Path, rng: np.random.Generator
) -> WarmupSample:
    one: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for name in sorted(warmup.inputs):
        meta = warmup.inputs[name]
        datatype = triton_from_config_type(mc.DataType.Name(meta.data_type))
        datatypes[name] = datatype
        one[name] = _input_data(name, meta, datatype, model_dir, rng)
    batch = int(warmup.batch_size)
    if spec.batching:
        # batch_size requests of [1] + dims executed together: one batch of batch_size.
        batched = {n: np.concatenate([a[np.newaxis]] * batch) for n, a in one.items()}
        executions: tuple[dict[str, np.ndarray], ...] = (batched,)
    else:
        executions = tuple(dict(one) for _ in range(batch))
    for inputs in executions[:1]:
        request = InferRequest(spec.name, "", f"warmup {label}", inputs, datatypes=datatypes)
        spec.validate(request)  # the same checks a client's request gets
    return WarmupSample(label, max(int(warmup.count), 1), executions)


def _input_data(
    name: str,
    meta: mc.ModelWarmup.Input,
    datatype: str,
    model_dir: Path,
    rng: np.random.Generator,
) -> np.ndarray:
    dims = tuple(int(d) for d in meta.dims)
    if any(d < 0 for d in dims):
        raise ConfigError(
            f"warmup setting expects all variable-size dimensions are specified for input "
            f"'{name}', got dims {list(dims)}"
        )
    count = math.prod(dims)
    which = meta.WhichOneof("input_data_type")
    if which is None:
        raise ConfigError(
            f"input '{name}' has no input_data_type: set zero_data, random_data or input_data_file"
        )
    if datatype == "BYTES":
        if which == "input_data_file":
            data = _read(model_dir, meta.input_data_file)
        else:  # zero and random data are both empty strings, as in Triton
            data = bytes(4 * count)
        return deserialize_bytes(data, count, name).reshape(dims)
    dtype = numpy_dtype(datatype)
    nbytes = count * element_size(datatype)
    if which == "zero_data":
        return np.zeros(dims, dtype=dtype)
    if which == "random_data":
        if datatype == "BOOL":
            return rng.integers(0, 2, size=dims).astype(np.bool_)
        raw = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
        return raw.view(dtype).reshape(dims)
    data = _read(model_dir, meta.input_data_file)
    if len(data) < nbytes:
        raise ConfigError(
            f"warmup setting expects {nbytes} bytes for input '{name}', but the data provided "
            f"from {meta.input_data_file} only has {len(data)} bytes"
        )
    return np.frombuffer(data[:nbytes], dtype=dtype).reshape(dims)


def _read(model_dir: Path, relative: str) -> bytes:
    folder = (model_dir / WARMUP_FOLDER).resolve()
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise ConfigError(f"input_data_file '{relative}' leaves the '{WARMUP_FOLDER}/' folder")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read input_data_file '{WARMUP_FOLDER}/{relative}': {exc.strerror}"
        ) from None


def run_warmup(
    runner: ModelRunner, samples: Sequence[WarmupSample], output_names: Sequence[str], model: str
) -> None:
    """Run every sample `count` times on every execution slot. Called at load, before any
    scheduler worker exists, so running a slot from this thread breaks no ownership rule.
    Raises ModelLoadError naming the sample."""
    for sample in samples:
        start = time.monotonic()
        for slot in range(runner.slot_count):
            for _ in range(sample.count):
                for inputs in sample.executions:
                    try:
                        runner.run(slot, inputs, output_names)
                    except Exception as exc:
                        raise ModelLoadError(
                            f"model '{model}': failed to run warmup sample '{sample.name}': {exc}"
                        ) from None
        log.info(
            "model '%s': warm-up sample '%s' ran %d time(s) on %d instance(s) in %.3fs",
            model,
            sample.name,
            sample.count,
            runner.slot_count,
            time.monotonic() - start,
        )
