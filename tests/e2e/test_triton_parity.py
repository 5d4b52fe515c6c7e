"""Triton parity through the real tritonclient: configs whose sections pipeserve does not
implement are refused by name (never silently served), and the answers Triton's clients and QA
scripts check (status codes, message prefixes) match Triton's.

One module-scoped server per control mode; tests that change a model use a model of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="module")
def none_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("parity_repo")
    place_model(repo, "plain", {1: om.scale(2.0)})
    for name, (config, _) in REFUSED.items():
        place_model(repo, name, {1: om.scale(1.0)}, config)
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
