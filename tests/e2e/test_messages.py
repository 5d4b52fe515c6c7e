"""What the server says, read as a user reads it: the start-up log names the execution providers
once and each model's device; a big load says when it begins; a failed load names the model
once, by its folder name even when config.pbtxt leaves `name` out; a JSON config override's
errors name fields the way the config writes them (max_batch_size, not maxBatchSize)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.server import ServerProcess
from tests.fixtures import graphs

BAD_BATCH = 'name: "bad_batch"\nmax_batch_size: -1\n'
# No `name`: the model is known only by its folder.
NAMELESS_MISSING_VERSION = "max_batch_size: 8\nversion_policy { specific { versions: [5] } }\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("messages")
    om.write_model(root, "good", om.add_sub())
    om.write_model(root, "bad_batch", om.add_sub(), config=BAD_BATCH)
    om.write_model(root, "nameless", om.add_sub(), config=NAMELESS_MISSING_VERSION)
    om.write_model(root, "overridden", om.add_sub())
    (root / "far" / "1").mkdir(parents=True)
    graphs.far_external_weights(root / "far" / "1")  # a sparse 3 GiB weight file
    proc = ServerProcess(
        root,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "good",
        "--load-model",
        "bad_batch",
        "--load-model",
        "nameless",
        "--load-model",
        "far",
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def test_start_log_names_the_providers_once_and_each_models_device(server: ServerProcess) -> None:
    providers = [line for line in server.lines if "execution providers:" in line]
    assert len(providers) == 1, server.output()
    assert "CPUExecutionProvider" in providers[0]
    assert (
        "every model instance runs on the CPU" in providers[0] or "CUDA device(s)" in providers[0]
    )
    assert any("model 'good': 1 instance(s) on " in line for line in server.lines)


def test_a_big_load_says_when_it_begins(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    lines = server.lines
    begins = [i for i, line in enumerate(lines) if "model 'far' v1: loading 3.0 GiB" in line]
    ready = [i for i, line in enumerate(lines) if "model 'far' ready" in line]
    assert len(begins) == 1 and len(ready) == 1 and begins[0] < ready[0], server.output()
    assert not any("model 'good' v1: loading" in line for line in lines)  # small: quiet
    assert client.is_model_ready("far")


def test_a_failed_load_names_the_model_once(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    failed = [line for line in server.lines if "failed to load model 'bad_batch'" in line]
    assert len(failed) == 1, server.output()
    assert failed[0].endswith(
        "failed to load model 'bad_batch': max_batch_size must be >= 0, got -1"
    )
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["bad_batch"].reason == "max_batch_size must be >= 0, got -1"
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("bad_batch")
    assert "model 'bad_batch': model 'bad_batch'" not in caught.value.message()
    assert "'bad_batch': max_batch_size must be >= 0, got -1" in caught.value.message()


def test_a_config_without_name_is_reported_by_its_folder(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    assert "model ''" not in server.output()
    failed = [line for line in server.lines if "failed to load model 'nameless'" in line]
    assert len(failed) == 1 and "version_policy asks for versions [5]" in failed[0]
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("nameless")
    assert "model ''" not in caught.value.message()
    assert "'nameless': version_policy asks for versions [5]" in caught.value.message()


@pytest.mark.parametrize(
    ("override", "names", "json_names"),
    [
        ({"maxBatchSize": "eight"}, ["max_batch_size"], ["maxBatchSize"]),
        (
            {"max_batch_size": 4, "dynamicBatching": {"maxQueueDelayMicroseconds": "soon"}},
            ["max_queue_delay_microseconds"],
            ["maxQueueDelayMicroseconds"],
        ),
        (
            {"max_batch_size": 4, "dynamic_batching": {"queue_delay": 5}},
            [
                'no field named "queue_delay"',
                "max_queue_delay_microseconds",
                "preferred_batch_size",
            ],
            ["maxQueueDelayMicroseconds", "preferredBatchSize", "Available Fields"],
        ),
    ],
    ids=["camel_case_key", "nested_camel_case_key", "unknown_field_lists_known_ones"],
)
def test_json_override_errors_name_fields_as_the_config_writes_them(
    client: grpcclient.InferenceServerClient,
    override: dict[str, object],
    names: list[str],
    json_names: list[str],
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("overridden", config=json.dumps(override))
    message = caught.value.message()
    assert "invalid JSON model configuration override" in message
    for name in names:
        assert name in message, message
    for json_name in json_names:
        assert json_name not in message, message
    assert "\n" not in message


def test_overridden_model_still_loads_with_a_good_override(
    client: grpcclient.InferenceServerClient,
) -> None:
    # The same model with a valid override (camelCase keys are valid JSON for protobuf too).
    client.load_model("overridden", config=json.dumps({"maxBatchSize": 4}))
    assert client.is_model_ready("overridden")
    assert client.get_model_config("overridden").config.max_batch_size == 4
