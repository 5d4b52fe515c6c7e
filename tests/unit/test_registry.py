"""Registry lifecycle with real ONNX models, in-process: load, reload swap, unload drain."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeserve.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from pipeserve.inference import InferRequest
from pipeserve.registry import ModelState, Registry
from tests import onnx_models as om


def _request(factor_input: np.ndarray, name: str = "scale") -> InferRequest:
    return InferRequest(name, "", "", {"x": factor_input})


def _submit(registry: Registry, request: InferRequest) -> asyncio.Future[dict[str, np.ndarray]]:
    # What the data plane does: look up and queue in one synchronous step.
    return registry.lookup(request.model_name, request.model_version).submit(request)


async def _infer(registry: Registry, x: np.ndarray) -> np.ndarray:
    return (await _submit(registry, _request(x)))["y"]


def test_load_serve_reload_unload(tmp_path):
    om.write_model(tmp_path, "scale", om.scale(2.0))

    async def scenario() -> None:
        registry = Registry(tmp_path)
        await registry.load("scale")
        x = np.ones((2, 4), np.float32)
        assert (await _infer(registry, x)).tolist() == (x * 2).tolist()
        assert registry.is_ready("scale", "1")

        # Requests queued before the reload finish on the old version; later ones see the new.
        before = [_submit(registry, _request(x)) for _ in range(20)]
        om.write_model(tmp_path, "scale", om.scale(3.0))
        await registry.load("scale")
        results = await asyncio.gather(*before)
        assert [r["y"][0, 0] for r in results] == [2.0] * 20
        assert (await _infer(registry, x))[0, 0] == 3.0

        in_flight = [_submit(registry, _request(x)) for _ in range(10)]
        await registry.unload("scale")
        assert len(await asyncio.gather(*in_flight)) == 10
        assert registry.index()[0].state is ModelState.UNAVAILABLE
        assert registry.index()[0].reason == "unloaded"
        with pytest.raises(ModelNotFoundError, match="Request for unknown model: 'scale'"):
            _submit(registry, _request(x))

    asyncio.run(scenario())


def test_failed_reload_keeps_old_version(tmp_path):
    om.write_model(tmp_path, "scale", om.scale(2.0))

    async def scenario() -> None:
        registry = Registry(tmp_path)
        await registry.load("scale")
        (tmp_path / "scale" / "1" / "model.onnx").write_bytes(b"corrupt")
        with pytest.raises(ModelLoadError, match="load failed for model 'scale'"):
            await registry.load("scale")
        assert (await _infer(registry, np.ones((1, 4), np.float32)))[0, 0] == 2.0
        assert registry.index()[0].state is ModelState.READY
        await registry.close()

    asyncio.run(scenario())


def test_failed_first_load_is_unavailable_with_reason(tmp_path):
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(b"corrupt")

    async def scenario() -> None:
        registry = Registry(tmp_path)
        with pytest.raises(ModelLoadError):
            await registry.load("bad")
        [entry] = registry.index()
        assert entry.state is ModelState.UNAVAILABLE and "failed to parse" in entry.reason

    asyncio.run(scenario())


def test_load_with_files_and_config_override(tmp_path):
    model = om.scale(5.0).SerializeToString()

    async def scenario() -> None:
        from pipeserve.repository.config import parse_config_json

        registry = Registry(tmp_path)
        await registry.load("fromfiles", parse_config_json("{}"), {"1/model.onnx": model})
        assert (await _infer_named(registry, "fromfiles"))[0, 0] == 5.0
        await registry.unload("fromfiles")

    asyncio.run(scenario())


async def _infer_named(registry: Registry, name: str) -> np.ndarray:
    return (await _submit(registry, _request(np.ones((1, 4), np.float32), name)))["y"]


def test_model_settings_are_read_once_and_frozen(tmp_path):
    import dataclasses

    from pipeserve.loader import read_model_settings
    from pipeserve.repository.config import complete_config, parse_config_text
    from pipeserve.repository.graph import read_graph_io

    folder = om.write_model(tmp_path, "scale", om.scale(2.0))
    text = (
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 100 }\n"
        'parameters { key: "pipeline_devices" value: { string_value: "cpu,cpu" } }\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "2" } }\n'
    )
    graph = read_graph_io(folder / "1" / "model.onnx")
    settings = read_model_settings(complete_config(parse_config_text(text, "t"), "scale", graph))
    assert settings.spec_for(3).version == 3 and settings.spec.max_batch_size == 8
    assert settings.batching is not None and settings.batching.max_queue_delay_ns == 100_000
    assert settings.pipeline is not None and [str(d) for d in settings.pipeline.devices] == [
        "cpu",
        "cpu",
    ]
    assert settings.instances.intra_op_threads == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.pipeline = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.parameters["pipeline_devices"] = "cpu"  # type: ignore[index]


def test_pipeline_stages_record_into_the_recorder_bound_before_the_runner(tmp_path):
    from prometheus_client import CollectorRegistry

    from pipeserve.metrics.recorder import ServerMetrics
    from tests.fixtures import graphs

    (tmp_path / "piped" / "1").mkdir(parents=True)
    (tmp_path / "piped" / "1" / "model.onnx").write_bytes(graphs.torch_model("mlp").read_bytes())
    (tmp_path / "piped" / "config.pbtxt").write_text(
        'parameters { key: "pipeline_devices" value: { string_value: "cpu,cpu" } }\n'
        'parameters { key: "pipeline_cost" value: { string_value: "estimate" } }\n'
    )
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(graphs.torch_model("mlp").read_bytes())
    (tmp_path / "bad" / "config.pbtxt").write_text(
        'parameters { key: "pipeline_devices" value: { string_value: "cpu,cpu" } }\n'
        'parameters { key: "pipeline_cuts" value: { string_value: "missing" } }\n'
    )
    metrics = ServerMetrics(CollectorRegistry(), process_metrics=False, detect_gpus=False)

    async def scenario() -> None:
        registry = Registry(tmp_path, metrics)
        await registry.load("piped")
        feeds = graphs.torch_inputs("mlp", 4)
        served = registry.lookup("piped")
        await served.submit(InferRequest("piped", "", "", feeds))
        recorder = metrics.bind_model("piped", 1)
        assert served.stats is recorder  # ModelStatistics reads the Prometheus recorder's counts
        # 4 rows through 2 stages: micro-batches of 2 (batch / stages), so 2 per stage.
        assert [(s.stage, s.device, c.count) for s, c, _ in recorder.stage_snapshots()] == [
            (0, "cpu", 2),
            (1, "cpu", 2),
        ]
        # A load that fails after binding leaves no series behind for a version nobody serves.
        with pytest.raises(ModelLoadError):
            await registry.load("bad")
        assert metrics.bound() == [("piped", 1)]
        await registry.close()

    asyncio.run(scenario())


def test_readiness_follows_every_model_and_each_change_is_told(tmp_path):
    om.write_model(tmp_path, "good", om.scale(2.0))
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(b"corrupt")
    changes: list[bool] = []

    async def scenario() -> None:
        registry = Registry(tmp_path, on_change=lambda: changes.append(registry.all_ready()))
        await registry.load("good")
        assert registry.all_ready() and changes == [False, True]  # LOADING, then READY
        with pytest.raises(ModelLoadError):
            await registry.load("bad")
        assert not registry.all_ready()
        assert set(registry.failures()) == {"bad"}
        assert registry.ready_names() == ["good"]
        await registry.unload("bad")  # unloaded on purpose: no longer expected to serve
        assert registry.all_ready() and registry.failures() == {}
        await registry.unload("never_loaded")  # nothing to do, as in Triton
        with pytest.raises(InvalidInputError, match="version string 'latest'"):
            registry.is_ready("good", "latest")
        with pytest.raises(InvalidInputError, match="invalid model version specified '-1'"):
            registry.lookup("good", "-1")
        await registry.close()

    asyncio.run(scenario())


def test_a_request_form_given_a_key_is_validated_once_and_its_batch_size_kept(tmp_path):
    om.write_model(tmp_path, "scale", om.scale(2.0))

    async def scenario() -> None:
        registry = Registry(tmp_path)
        await registry.load("scale")
        served = registry.lookup("scale", "")
        form, bad_form = object(), object()
        for rows in (3, 3):  # the second takes the kept batch size
            request = _request(np.ones((rows, 4), np.float32))
            out = await served.submit(request, checked_as=form)
            assert request.batch_size == 3
            assert out["y"].tolist() == [[2.0] * 4] * 3
        for _ in range(2):  # a form that fails is not kept: it fails every time
            with pytest.raises(InvalidInputError, match="unexpected shape for input 'x'"):
                served.submit(_request(np.ones((1, 5), np.float32)), checked_as=bad_form)
        await registry.close()

    asyncio.run(scenario())
