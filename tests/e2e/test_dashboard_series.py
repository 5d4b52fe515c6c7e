"""The Grafana dashboard (docker/grafana/dashboards/pipeserve.json) and the HPA example query only
series the real server exports, with the labels they group by.

Starts pipeserve over a repository with a dynamically batched model and a two-stage CPU pipeline,
sends one inference to each with tritonclient, scrapes /metrics and looks up every series, label
matcher, grouping label and legend label that the dashboard names. A renamed metric or label fails
here instead of leaving an empty panel in Grafana.
"""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from tests import onnx_models as om
from tests.e2e.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "pipeserve.json"
HPA = ROOT / "docker" / "k8s" / "hpa.yaml"
# Labels Prometheus attaches to every sample at scrape time; the server never writes them.
TARGET_LABELS = frozenset({"instance", "job"})
# NVML gauges exist only on hosts with an NVIDIA GPU; elsewhere they are looked up in the source.
GPU_PREFIX = "nv_gpu_"

PIPELINE_CONFIG = """
name: "mlp_pipeline"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 8 ] } ]
dynamic_batching { }
parameters { key: "pipeline_devices" value { string_value: "cpu,cpu" } }
"""


def _dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_dashboard", ROOT / "docker" / "grafana" / "make_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DASH = _dashboard_module()


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """{sample name: every label name seen on it} after one inference per model."""
    repo = tmp_path_factory.mktemp("dashboard_repo")
    om.write_model(repo, "add_sub", om.add_sub(), config=om.ADD_SUB_CONFIG)
    om.write_model(repo, "mlp_pipeline", om.mlp(), config=PIPELINE_CONFIG)
    proc = ServerProcess(repo).wait_ready()
    try:
        with grpcclient.InferenceServerClient(proc.url) as client:
            a = np.ones((2, 16), dtype=np.float32)
            client.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", a, "FP32")])
            y = client.infer("mlp_pipeline", [_input("x", a, "FP32")]).as_numpy("y")
            assert y is not None and y.shape == (2, 8)
        with urllib.request.urlopen(proc.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        proc.stop()
    yield sample_labels(text)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:\\.|[^"\\])*"')


def sample_labels(text: str) -> dict[str, set[str]]:
    """{sample name: label names} from Prometheus text format, names exactly as Prometheus
    stores them. (prometheus_client's parser would rename Triton's bare counters to _total.)"""
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels.setdefault(match.group(1), set()).update(_LABEL.findall(match.group(2) or ""))
    return labels


def test_sample_labels_reads_the_text_format() -> None:
    text = (
        "# HELP a_total x\n# TYPE a counter\n"
        'a_total{model="m",reason="say \\"hi\\", ok"} 1\nb 2.5\n'
        'c_bucket{le="+Inf",model="m"} 3\n'
    )
    assert sample_labels(text) == {
        "a_total": {"model", "reason"},
        "b": set(),
        "c_bucket": {"le", "model"},
    }


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _gpu_series_defined(name: str) -> bool:
    source = (ROOT / "server" / "pipeserve" / "metrics" / "gpu.py").read_text()
    return f'"{name}"' in source


def test_every_dashboard_series_is_in_the_scrape(
    scrape: dict[str, set[str]], board: dict[str, Any]
) -> None:
    series = DASH.series_in_dashboard(board)
    assert len(series) >= 15, "the dashboard parser found too few series to be trusted"
    gpu_scraped = any(name.startswith(GPU_PREFIX) for name in scrape)
    missing = []
    for name, users in sorted(series.items()):
        if name in scrape:
            continue
        if name.startswith(GPU_PREFIX) and not gpu_scraped:
            assert _gpu_series_defined(name), f"{name} (used by {sorted(users)}) is not exported"
            continue
        missing.append(f"{name} (used by {sorted(users)})")
    assert not missing, "dashboard series absent from /metrics:\n" + "\n".join(missing)


_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def _label_uses(expr: str, legend: str) -> set[str]:
    used = {lbl.strip() for group in _GROUPING.findall(expr) for lbl in group.split(",")}
    for block in re.findall(r"\{([^}]*)\}", expr):
        used.update(_MATCHER_LABEL.findall(block))
    used.update(_LEGEND_LABEL.findall(legend))
    return used - {""}


def test_dashboard_labels_exist_on_the_series_they_filter_and_group(
    scrape: dict[str, set[str]], board: dict[str, Any]
) -> None:
    problems = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names = [n for n in DASH.series_in_expr(target["expr"]) if n in scrape]
            if not names:  # GPU-only panel on a CPU host (checked above)
                continue
            available = set().union(*(scrape[n] for n in names)) | TARGET_LABELS
            unknown = _label_uses(target["expr"], target["legendFormat"]) - available
            if unknown:
                problems.append(f"{panel['title']}: {sorted(unknown)} not on {sorted(names)}")
    for variable in board["templating"]["list"]:
        metric, label = re.findall(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])[0]
        if label not in scrape[metric] | TARGET_LABELS:
            problems.append(f"${variable['name']}: {metric} has no label {label}")
    assert not problems, "\n".join(problems)


def test_pipeline_stage_series_name_each_stage_and_device(scrape: dict[str, set[str]]) -> None:
    for name in (
        "pipeserve_stage_compute_duration_seconds_bucket",
        "pipeserve_stage_busy_seconds_total",
    ):
        assert {"model", "stage", "device"} <= scrape.get(name, set()), name


def test_hpa_metric_is_exported(scrape: dict[str, set[str]]) -> None:
    (metric,) = yaml.safe_load(HPA.read_text())["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in scrape, f"docker/k8s/hpa.yaml scales on {name}, which /metrics lacks"
