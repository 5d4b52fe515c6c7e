"""Triton parity through the real tritonclient: configs whose sections pipeserve does not
implement are refused by name (never silently served), and the answers Triton's clients and QA
scripts check (status codes, message prefixes) match Triton's.

One module-scoped server per control mode; tests that change a model use a model of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models as om
from tests.e2e.lifecycle import client_for, factor_of, index_of, place_model, start
from tests.e2e.server import ServerProcess

# ---- config honesty: nothing silently ignored --------------------------------------------------

REFUSED = {
    "sequence": (
        "max_batch_size: 4\nsequence_batching { max_sequence_idle_microseconds: 1000 }",
        "config section 'sequence_batching' is not supported",
    ),
    "ensemble": (
        'ensemble_scheduling { step [ { model_name: "plain" model_version: -1 } ] }',
        "config section 'ensemble_scheduling' is not supported",
    ),
    "cached": (
        "response_cache { enable: true }",
        "config section 'response_cache' is not supported",
    ),
    "reshaped": (
        'max_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] '
        "reshape { shape: [ 2, 2 ] } } ]",
        "config section 'input.reshape' (input 'x') is not supported",
    ),
}


WARMUP = """
max_batch_size: 8
model_warmup [ {{
  name: "{name}" batch_size: 4 count: 2
  inputs {{ key: "{key}" value: {{ data_type: {dtype} dims: [ {dims} ] {data} }} }}
}} ]
"""
WARMED = WARMUP.format(name="w", key="x", dtype="TYPE_FP32", dims="4", data="random_data: true")
WARM_BAD_DIMS = WARMUP.format(
    name="v", key="x", dtype="TYPE_FP32", dims="-1", data="zero_data: true"
)
# An index outside the gather table: onnxruntime fails while running the warm-up sample.
WARM_FAILS = WARMUP.format(
    name="oob", key="idx", dtype="TYPE_INT64", dims="1", data='input_data_file: "oob.bin"'
)


@pytest.fixture(scope="module")
def none_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("parity_repo")
    place_model(repo, "plain", {1: om.scale(2.0)})
    for name, (config, _) in REFUSED.items():
        place_model(repo, name, {1: om.scale(1.0)}, config)
    place_model(repo, "warmed", {1: om.scale(3.0)}, WARMED)
    place_model(repo, "warm_bad_dims", {1: om.scale(1.0)}, WARM_BAD_DIMS)
    folder = place_model(repo, "warm_fails", {1: om.gather()}, WARM_FAILS)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "oob.bin").write_bytes(np.array([100], np.int64).tobytes())
    return repo


@pytest.fixture(scope="module")
def none_server(none_repo: Path) -> Iterator[ServerProcess]:
    yield from start(none_repo)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unimplemented_config_section_is_refused_by_name(
    none_server: ServerProcess, name: str
) -> None:
    client = client_for(none_server)
    [(_, state, reason)] = index_of(client)[name]
    assert state == "UNAVAILABLE"
    assert REFUSED[name][1] in reason, reason
    assert not client.is_model_ready(name)
    # The other models keep serving.
    assert factor_of(client, "plain") == 2.0


# ---- model_warmup ---------------------------------------------------------------------------


def test_warmup_runs_before_the_model_is_ready(none_server: ServerProcess) -> None:
    client = client_for(none_server)
    assert client.is_model_ready("warmed")
    assert factor_of(client, "warmed") == 3.0
    lines = none_server.lines
    ran = [i for i, line in enumerate(lines) if "model 'warmed': warm-up sample 'w' ran 2" in line]
    ready = [i for i, line in enumerate(lines) if "model 'warmed' ready" in line]
    assert ran and ready and ran[0] < ready[0], none_server.output()
    # Warm-up executions are not client requests: statistics start at zero.
    [stats] = client.get_inference_statistics("warmed").model_stats
    assert stats.inference_stats.success.count == 1  # the factor_of request only


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("warm_bad_dims", "model_warmup 'v': warmup setting expects all variable-size dimensions"),
        ("warm_fails", "failed to run warmup sample 'oob': "),
    ],
)
def test_failing_warmup_fails_the_load_with_the_reason(
    none_server: ServerProcess, name: str, reason: str
) -> None:
    client = client_for(none_server)
    [(_, state, got)] = index_of(client)[name]
    assert state == "UNAVAILABLE"
    assert reason in got, got
    assert not client.is_model_ready(name)
