"""The dynamic batcher through the real server and the real tritonclient: batches form (seen in
ModelStatistics), streaming requests batch like unary ones, and every rejection path answers with
its status code and message.

Determinism without sleeps: models wait 60 s for a batch to fill, so a batch that is answered at
all was formed by the rule under test (preferred size reached, queue timeout, client cancel)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models as om
from tests.e2e.server import ServerProcess, wait_until

WAIT_FOREVER_US = 60_000_000  # a batch delay no test waits out

IO = om.ADD_SUB_IO

MODELS = {
    # Only a preferred size of 4 sends a batch.
    "batch4": f"dynamic_batching {{ preferred_batch_size: [ 4 ] "
    f"max_queue_delay_microseconds: {WAIT_FOREVER_US} }}",
    "stream4": f"dynamic_batching {{ preferred_batch_size: [ 4 ] "
    f"max_queue_delay_microseconds: {WAIT_FOREVER_US} }}",
    # Two requests can queue (they wait for a third), the third is refused.
    "queue2": f"dynamic_batching {{ preferred_batch_size: [ 3 ] "
    f"max_queue_delay_microseconds: {WAIT_FOREVER_US} "
    f"default_queue_policy {{ max_queue_size: 2 }} }}",
    "timeout": f"dynamic_batching {{ max_queue_delay_microseconds: {WAIT_FOREVER_US} "
    f"default_queue_policy {{ default_timeout_microseconds: 200000 }} }}",
    "override": f"dynamic_batching {{ max_queue_delay_microseconds: {WAIT_FOREVER_US} "
    f"default_queue_policy {{ default_timeout_microseconds: {WAIT_FOREVER_US} "
    f"allow_timeout_override: true }} }}",
    # Expired requests are delayed, not rejected: the 300 ms batch delay still sends them.
    "delayed": "dynamic_batching { max_queue_delay_microseconds: 300000 "
    "default_queue_policy { default_timeout_microseconds: 1000 timeout_action: DELAY } }",
    "cancel": f"dynamic_batching {{ max_queue_delay_microseconds: {WAIT_FOREVER_US} }}",
    "priorities": "dynamic_batching { priority_levels: 2 default_priority_level: 2 }",
    "adaptive": 'dynamic_batching { }\nparameters { key: "batching_mode" value: '
    '{ string_value: "adaptive" } }',
    "bad_preferred": "dynamic_batching { preferred_batch_size: [ 99 ] }",
    "bad_mode": 'dynamic_batching { }\nparameters { key: "batching_mode" value: '
    '{ string_value: "turbo" } }',
}


def _config(name: str, body: str) -> str:
    return f'name: "{name}"\nmax_batch_size: 8\n{IO}\n{body}\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("batching_repo")
    for name, body in MODELS.items():
        om.write_model(root, name, om.add_sub(), config=_config(name, body))
    proc = ServerProcess(root).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


def inputs(seed: int, rows: int = 1, aio: bool = False) -> tuple[list, np.ndarray]:
    """INPUT0/INPUT1 and the expected OUTPUT0 (their sum)."""
    module = aioclient if aio else grpcclient
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, 16)).astype(np.float32)
    b = rng.standard_normal((rows, 16)).astype(np.float32)
    tensors = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        t = module.InferInput(name, [rows, 16], "FP32")
        t.set_data_from_numpy(array)
        tensors.append(t)
    return tensors, a + b


def stats(client: grpcclient.InferenceServerClient, model: str):  # type: ignore[no-untyped-def]
    return client.get_inference_statistics(model).model_stats[0]


def run_aio(server: ServerProcess, body):  # type: ignore[no-untyped-def]
    async def wrapper():  # type: ignore[no-untyped-def]
        c = aioclient.InferenceServerClient(server.url)
        try:
            return await asyncio.wait_for(body(c), 60)
        finally:
            await c.close()

    return asyncio.run(wrapper())


# ---- batches form ------------------------------------------------------------------------------


def test_concurrent_requests_form_one_batch(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    async def body(c: aioclient.InferenceServerClient) -> None:
        cases = [inputs(seed) for seed in range(4)]
        results = await asyncio.gather(*(c.infer("batch4", tensors) for tensors, _ in cases))
        for result, (_, expected) in zip(results, cases, strict=True):
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)

    run_aio(server, body)
    s = stats(client, "batch4")
    assert (s.inference_count, s.execution_count) == (4, 1)
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [(4, 1)]
    assert s.inference_stats.success.count == 4
    assert s.inference_stats.queue.count == 4


def test_stream_requests_batch_like_unary_ones(
    client: grpcclient.InferenceServerClient,
) -> None:
    outcomes: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
    try:
        expected = {}
        for i in range(4):
            tensors, want = inputs(100 + i)
            client.async_stream_infer("stream4", tensors, request_id=f"r{i}")
            expected[f"r{i}"] = want
        for _ in range(4):
            result, error = outcomes.get(timeout=30)
            assert error is None
            rid = result.get_response().id
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected[rid], rtol=1e-6)
    finally:
        client.stop_stream()
    s = stats(client, "stream4")
    assert (s.inference_count, s.execution_count) == (4, 1)


def test_request_batch_dimension_counts_by_its_size(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    # A 3-row request and a 1-row request reach the preferred size 4 together.
    async def body(c: aioclient.InferenceServerClient) -> None:
        (t3, e3), (t1, e1) = inputs(7, rows=3, aio=True), inputs(8, aio=True)
        r3, r1 = await asyncio.gather(c.infer("batch4", t3), c.infer("batch4", t1))
        np.testing.assert_allclose(r3.as_numpy("OUTPUT0"), e3, rtol=1e-6)
        np.testing.assert_allclose(r1.as_numpy("OUTPUT0"), e1, rtol=1e-6)

    before = stats(client, "batch4")
    run_aio(server, body)
    after = stats(client, "batch4")
    assert after.inference_count - before.inference_count == 4
    assert after.execution_count - before.execution_count == 1


# ---- rejections --------------------------------------------------------------------------------


def test_queue_full_is_unavailable_at_once(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    async def body(c: aioclient.InferenceServerClient) -> None:
        # Three requests for a queue of 2 whose batch waits for 3: two queue (and would wait
        # 60 s), so the first answer must be the refusal of whichever came third.
        calls = [
            asyncio.ensure_future(c.infer("queue2", inputs(i, aio=True)[0], client_timeout=30))
            for i in range(3)
        ]
        done, waiting = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(waiting) == 2
        error = done.pop().exception()
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert error.message() == "Exceeds maximum queue size"
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    run_aio(server, body)
    assert stats(client, "queue2").execution_count == 0


def test_queue_timeout_is_unavailable(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("timeout", inputs(1)[0], client_timeout=30)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in info.value.message()
    s = stats(client, "timeout")
    assert (s.inference_stats.fail.count, s.execution_count) == (1, 0)


def test_request_timeout_parameter_lowers_the_default(
    client: grpcclient.InferenceServerClient,
) -> None:
    # The level waits 60 s; the request's own `timeout` (microseconds) of 100 ms applies.
    with pytest.raises(InferenceServerException) as info:
        client.infer("override", inputs(1)[0], timeout=100_000, client_timeout=30)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "Request timeout expired" in info.value.message()


def test_delay_action_executes_expired_requests(client: grpcclient.InferenceServerClient) -> None:
    tensors, expected = inputs(5)
    result = client.infer("delayed", tensors, client_timeout=30)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)
    s = stats(client, "delayed")
    assert (s.inference_stats.success.count, s.inference_stats.fail.count) == (1, 0)


def test_client_deadline_drops_the_queued_request(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("cancel", inputs(1)[0], client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The server sees the cancellation, drops the request and counts it as failed, never run.
    assert wait_until(lambda: stats(client, "cancel").inference_stats.fail.count == 1)
    assert stats(client, "cancel").execution_count == 0


def test_priority_parameter_in_and_out_of_range_is_served(
    client: grpcclient.InferenceServerClient,
) -> None:
    for priority in (1, 2, 0, 99):
        tensors, expected = inputs(priority)
        result = client.infer("priorities", tensors, priority=priority)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)


def test_adaptive_mode_serves(client: grpcclient.InferenceServerClient) -> None:
    tensors, expected = inputs(3)
    result = client.infer("adaptive", tensors)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("bad_preferred", "preferred_batch_size 99 must be in [1, max_batch_size=8]"),
        ("bad_mode", "parameter 'batching_mode' is 'turbo', expected one of"),
    ],
)
def test_invalid_batching_config_fails_the_load_with_the_reason(
    client: grpcclient.InferenceServerClient, model: str, message: str
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[model].state == "UNAVAILABLE"
    assert message in index[model].reason
    assert not client.is_model_ready(model)
