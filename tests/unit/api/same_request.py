"""One check for the tests of the kept-head paths: two InferRequests say the same."""

from __future__ import annotations

from pipeserve.inference import InferRequest

_FIELDS = (
    "model_name",
    "model_version",
    "request_id",
    "requested_outputs",
    "parameters",
    "datatypes",
    "priority",
    "timeout_us",
    "classification",
    "batch_size",
)


def assert_same_request(a: InferRequest, b: InferRequest) -> None:
    for attr in _FIELDS:
        assert getattr(a, attr) == getattr(b, attr), attr
    assert list(a.inputs) == list(b.inputs)
    for name, array in a.inputs.items():
        other = b.inputs[name]
        assert array.dtype == other.dtype and array.shape == other.shape, name
        assert array.tolist() == other.tolist(), name
