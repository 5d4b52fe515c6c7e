"""Bidirectional streaming (tritonclient's start_stream / async_stream_infer, the aio client's
stream_infer, and the raw stub) and the asyncio client (tritonclient.grpc.aio).

An error answers its own request on the stream and the stream goes on."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess

Outcome = tuple[grpcclient.InferResult | None, InferenceServerException | None]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


def add_sub_inputs(batch: int, seed: int) -> tuple[list[grpcclient.InferInput], np.ndarray]:
    """Inputs and the expected OUTPUT0 (a + b)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, 16)).astype(np.float32)
    b = rng.standard_normal((batch, 16)).astype(np.float32)
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        t = grpcclient.InferInput(name, [batch, 16], "FP32")
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs, a + b


def wrong_shape_inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = grpcclient.InferInput(name, [1, 8], "FP32")
        t.set_data_from_numpy(np.zeros((1, 8), np.float32))
        inputs.append(t)
    return inputs


def strings_input(values: list[bytes]) -> list[grpcclient.InferInput]:
    t = grpcclient.InferInput("INPUT0", [len(values)], "BYTES")
    t.set_data_from_numpy(np.array(values, dtype=np.object_))
    return [t]


def collect(outcomes: queue.Queue[Outcome], n: int) -> list[Outcome]:
    return [outcomes.get(timeout=30) for _ in range(n)]


# ---- sync client: start_stream + async_stream_infer ----------------------------------------------


def test_stream_many_in_flight_with_errors_in_the_middle(
    client: grpcclient.InferenceServerClient,
) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        expected: dict[str, np.ndarray] = {}
        # All 24 are sent before any response is read: several are in flight at once.
        for i in range(24):
            if i == 8:
                client.async_stream_infer("add_sub", wrong_shape_inputs(), request_id="bad-shape")
            elif i == 16:
                inputs, _ = add_sub_inputs(1, seed=i)
                client.async_stream_infer("no_such_model", inputs, request_id="bad-model")
            else:
                inputs, plus = add_sub_inputs(1 + i % 8, seed=i)
                expected[f"s{i}"] = plus
                client.async_stream_infer("add_sub", inputs, request_id=f"s{i}")
        first = collect(outcomes, 24)

        # The same stream still serves after the errors.
        for i in range(24, 30):
            inputs, plus = add_sub_inputs(2, seed=i)
            expected[f"s{i}"] = plus
            client.async_stream_infer("add_sub", inputs, request_id=f"s{i}")
        later = collect(outcomes, 6)
    finally:
        client.stop_stream()

    errors = sorted(str(error.message()) for result, error in first + later if error is not None)
    assert len(errors) == 2
    assert errors[0] == "Request for unknown model: 'no_such_model' is not found"
    assert "unexpected shape for input 'INPUT0' for model 'add_sub'" in errors[1]
    seen = {}
    for result, error in first + later:
        if error is None:
            assert result is not None
            seen[result.get_response().id] = result.as_numpy("OUTPUT0")
    assert set(seen) == set(expected)
    for request_id, plus in expected.items():
        np.testing.assert_allclose(seen[request_id], plus, rtol=1e-6)


def test_stream_more_requests_than_its_window_all_answered(
    client: grpcclient.InferenceServerClient,
) -> None:
    """600 requests sent before any answer is read: more than the server keeps in flight for
    one stream (STREAM_WINDOW, 256). The rest wait for the window, none is lost."""
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        inputs, plus = add_sub_inputs(2, seed=3)
        for i in range(600):
            client.async_stream_infer("add_sub", inputs, request_id=f"w{i}")
        answers = collect(outcomes, 600)
    finally:
        client.stop_stream()
    assert [error for _, error in answers if error is not None] == []
    ids = set()
    for result, _ in answers:
        assert result is not None
        ids.add(result.get_response().id)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), plus, rtol=1e-6)
    assert ids == {f"w{i}" for i in range(600)}


def test_stream_to_several_models(client: grpcclient.InferenceServerClient) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        inputs, plus = add_sub_inputs(3, seed=1)
        client.async_stream_infer("add_sub", inputs, request_id="numbers")
        words = [b"one", "tw\u00f6".encode(), b""]
        client.async_stream_infer("strings", strings_input(words), request_id="words")
        ints = np.arange(6, dtype=np.int32).reshape(2, 3)
        t = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
        t.set_data_from_numpy(ints)
        client.async_stream_infer("int_identity", [t], model_version="1", request_id="ints")
        results = collect(outcomes, 3)
    finally:
        client.stop_stream()
    assert all(error is None for _, error in results)
    by_id = {r.get_response().id: r for r, _ in results if r is not None}
    np.testing.assert_allclose(by_id["numbers"].as_numpy("OUTPUT0"), plus, rtol=1e-6)
    assert by_id["words"].as_numpy("OUTPUT0").tolist() == words
    np.testing.assert_array_equal(by_id["ints"].as_numpy("OUTPUT0"), ints)
    assert by_id["ints"].get_response().model_name == "int_identity"


def test_stream_requested_outputs(client: grpcclient.InferenceServerClient) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        inputs, _ = add_sub_inputs(1, seed=3)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT1")]
        client.async_stream_infer("add_sub", inputs, outputs=outputs, request_id="only-1")
        [(result, error)] = collect(outcomes, 1)
    finally:
        client.stop_stream()
    assert error is None and result is not None
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]


def test_stream_error_for_undecodable_bytes(client: grpcclient.InferenceServerClient) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        client.async_stream_infer("strings", strings_input([b"a", b"\xff", b"c"]))
        client.async_stream_infer("strings", strings_input([b"a", b"b", b"c"]), request_id="ok")
        outcomes_list = collect(outcomes, 2)
    finally:
        client.stop_stream()
    errors = [e for _, e in outcomes_list if e is not None]
    assert len(errors) == 1
    assert "input 'INPUT0': BYTES element 1 is not valid UTF-8" in str(errors[0].message())
    results = [r for r, _ in outcomes_list if r is not None]
    assert [r.get_response().id for r in results] == ["ok"]


# ---- raw stub: what an error response carries -------------------------------------------------


def test_stream_error_response_names_the_failed_request(server: ServerProcess) -> None:
    """Each error response carries the failed request's id and model, so a client can match it."""
    good = service_pb2.ModelInferRequest(model_name="strings", model_version="1", id="good")
    good.inputs.add(name="INPUT0", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        [b"x", b"", b"yz"]
    )
    bad = service_pb2.ModelInferRequest(model_name="strings", id="truncated")
    bad.inputs.add(name="INPUT0", datatype="BYTES", shape=[3])
    bad.raw_input_contents.append(b"\x05\x00")
    unknown = service_pb2.ModelInferRequest(model_name="nope", id="unknown")
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter([bad, good, unknown]), timeout=30))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"good", "truncated", "unknown"}
    assert by_id["good"].error_message == ""
    assert by_id["good"].infer_response.model_name == "strings"
    assert by_id["good"].infer_response.raw_output_contents[0] == (
        b"\x01\x00\x00\x00x" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00yz"
    )
    assert by_id["truncated"].infer_response.model_name == "strings"
    assert (
        "incomplete string length indicator for inference input 'INPUT0' for model 'strings'"
        in by_id["truncated"].error_message
    )
    assert by_id["unknown"].error_message == "Request for unknown model: 'nope' is not found"


def test_a_message_that_does_not_parse_ends_the_stream_as_unary_calls_end(
    server: ServerProcess,
) -> None:
    """The answers before it arrive; the call then ends INTERNAL, as a unary ModelInfer whose
    message does not parse does (grpc.aio's front end says UNKNOWN there)."""
    good = service_pb2.ModelInferRequest(model_name="strings", id="before")
    good.inputs.add(name="INPUT0", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        [b"x", b"y", b"z"]
    )
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        replies = call(iter([good, b"\xff\xff\xff"]), timeout=30)
        first = next(replies)
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
    assert first.infer_response.id == "before" and first.error_message == ""
    assert err.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert err.value.details().startswith("could not parse the request message: ")  # type: ignore[attr-defined]


def test_empty_stream_closes_cleanly(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert list(stub.ModelStreamInfer(iter([]), timeout=30)) == []


# ---- asyncio client ---------------------------------------------------------------------------


def test_aio_health_and_metadata(server: ServerProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as c:
            assert await c.is_server_live()
            assert await c.is_server_ready()
            assert await c.is_model_ready("add_sub")
            assert not await c.is_model_ready("add_sub", "5")
            meta = await c.get_server_metadata()
            assert meta.name == "pipeserve"
            model = await c.get_model_metadata("add_sub")
            assert [i.name for i in model.inputs] == ["INPUT0", "INPUT1"]
            config = await c.get_model_config("add_sub_auto", as_json=True)
            assert config["config"]["max_batch_size"] == 4
            index = await c.get_model_repository_index()
            assert {m.name for m in index.models} >= {"add_sub", "broken"}

    asyncio.run(main())


def test_aio_concurrent_infer(server: ServerProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as c:
            cases = [add_sub_inputs(1 + i % 8, seed=200 + i) for i in range(24)]
            results = await asyncio.gather(
                *(
                    c.infer("add_sub", inputs, request_id=f"aio-{i}")
                    for i, (inputs, _) in enumerate(cases)
                )
            )
            for i, (result, (_, plus)) in enumerate(zip(results, cases, strict=True)):
                assert result.get_response().id == f"aio-{i}"
                np.testing.assert_allclose(result.as_numpy("OUTPUT0"), plus, rtol=1e-6)

    asyncio.run(main())


def test_aio_errors(server: ServerProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as c:
            inputs, _ = add_sub_inputs(1, seed=0)
            with pytest.raises(InferenceServerException) as info:
                await c.infer("no_such_model", inputs)
            assert info.value.status() == "StatusCode.NOT_FOUND"
            assert info.value.message() == "Request for unknown model: 'no_such_model' is not found"
            with pytest.raises(InferenceServerException) as info:
                await c.infer("add_sub", wrong_shape_inputs())
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "Expected [-1,16], got [1,8]" in str(info.value.message())
            with pytest.raises(InferenceServerException) as info:
                await c.get_log_settings()
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            # The client is still usable after errors.
            result = await c.infer("add_sub", inputs)
            assert result.as_numpy("OUTPUT0").shape == (1, 16)

    asyncio.run(main())


def test_aio_stream_infer_with_an_error_in_the_middle(server: ServerProcess) -> None:
    expected: dict[str, np.ndarray] = {}

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(16):
            if i == 5:
                yield {"model_name": "add_sub", "inputs": wrong_shape_inputs(), "request_id": "x"}
                continue
            inputs, plus = add_sub_inputs(1 + i % 4, seed=300 + i)
            expected[f"aio-s{i}"] = plus
            yield {"model_name": "add_sub", "inputs": inputs, "request_id": f"aio-s{i}"}

    async def main() -> tuple[dict[str, np.ndarray], list[str]]:
        seen: dict[str, np.ndarray] = {}
        errors: list[str] = []
        async with aioclient.InferenceServerClient(server.url) as c:
            # The response iterator ends when the server has answered every request.
            async for result, error in c.stream_infer(requests(), stream_timeout=60):
                if error is not None:
                    errors.append(str(error.message()))
                else:
                    seen[result.get_response().id] = result.as_numpy("OUTPUT0")
        return seen, errors

    seen, errors = asyncio.run(main())
    assert len(errors) == 1
    assert "unexpected shape for input 'INPUT0'" in errors[0]
    assert set(seen) == set(expected)
    for request_id, plus in expected.items():
        np.testing.assert_allclose(seen[request_id], plus, rtol=1e-6)


def test_statistics_count_stream_requests(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Stream requests are counted like unary ones (one success per answered request)."""
    before = client.get_inference_statistics("int_identity").model_stats[0].inference_stats
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        for i in range(5):
            t = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
            t.set_data_from_numpy(np.full((2, 3), i, np.int32))
            client.async_stream_infer("int_identity", [t])
        bad = grpcclient.InferInput("INPUT0", [3, 2], "INT32")
        bad.set_data_from_numpy(np.zeros((3, 2), np.int32))
        client.async_stream_infer("int_identity", [bad])
        results = collect(outcomes, 6)
    finally:
        client.stop_stream()
    assert sum(error is not None for _, error in results) == 1
    after = client.get_inference_statistics("int_identity").model_stats[0].inference_stats
    assert after.success.count - before.success.count == 5
    assert after.fail.count - before.fail.count == 1


def test_stream_cancelled_with_requests_in_flight(
    client: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    inputs, plus = add_sub_inputs(8, seed=9)
    for i in range(100):
        client.async_stream_infer("add_sub", inputs, request_id=f"c{i}")
    client.stop_stream(cancel_requests=True)
    # Whatever was answered before the cancel is right; the server goes on serving.
    while not outcomes.empty():
        result, error = outcomes.get()
        if error is None:
            assert result is not None
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), plus, rtol=1e-6)
        else:
            assert error.status() == "StatusCode.CANCELLED"
    np.testing.assert_allclose(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), plus, rtol=1e-6)
    assert server.proc.poll() is None


def test_no_unexpected_server_errors(server: ServerProcess) -> None:
    """Every error above was answered on purpose: nothing reached the 'unexpected error' log."""
    assert not [line for line in server.lines if "Traceback" in line or "unexpected" in line]
