"""Writes docker/grafana/dashboards/pipeserve.json, the Grafana dashboard that compose.yaml
provisions. Edit the panels here, not the JSON:

    .venv/bin/python docker/grafana/make_dashboard.py          # rewrite the JSON
    .venv/bin/python docker/grafana/make_dashboard.py --check  # exit 1 if the JSON is stale

Series names are the ones server/pipeserve/metrics/ exports (docs/metrics.md):
tests/e2e/test_dashboard_series.py checks every series named in these queries against a live
scrape of the real server, so a renamed metric fails a test instead of leaving an empty panel.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "pipeserve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources uid
SELECT = 'model=~"$model", instance=~"$instance"'
RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.95, 0.99)

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: int, **extra: Any) -> dict[str, Any]:
    return {
        "refId": chr(ord("A") + ref),
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        **extra,
    }


def timeseries(
    title: str, description: str, unit: str, exprs: list[tuple[str, str]], *, stack: bool = False
) -> Panel:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 20 if stack else 0,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "showPoints": "never",
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["mean", "lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [target(e, legend, i) for i, (e, legend) in enumerate(exprs)],
    }


def quantiles(title: str, description: str, histogram: str, by: str) -> Panel:
    """p50/p95/p99 of a latency histogram (seconds), one line per `by` group and quantile."""
    legend = " ".join("{{" + label + "}}" for label in by.split(", "))
    exprs = [
        (
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({histogram}_bucket{{{SELECT}}}{RATE})))",
            f"{legend} p{round(q * 100)}",
        )
        for q in QUANTILES
    ]
    return timeseries(title, description, "s", exprs)


def batch_heatmap() -> Panel:
    return {
        "type": "heatmap",
        "title": "Batch size distribution",
        "description": "Executions per batch-size bucket (pipeserve_batch_size). A dynamic "
        "batcher under load should move weight toward the preferred sizes.",
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "yAxis": {"axisLabel": "batch size", "unit": "none"},
            "tooltip": {"mode": "single", "yHistogram": False},
            "legend": {"show": True},
        },
        "targets": [
            target(
                f"sum by (le) (increase(pipeserve_batch_size_bucket{{{SELECT}}}{RATE}))",
                "{{le}}",
                0,
                format="heatmap",
            )
        ],
    }


def stat(title: str, description: str, unit: str, expr: str, legend: str) -> Panel:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {
            "orientation": "horizontal",
            "displayMode": "basic",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
        "targets": [target(expr, legend, 0, instant=True, range=False)],
    }


def rows() -> list[tuple[str, list[Panel]]]:
    per_request = f"sum by (model) (rate(nv_inference_request_success{{{SELECT}}}{RATE}))"

    def mean_us(counter: str) -> str:
        return f"sum by (model) (rate({counter}{{{SELECT}}}{RATE})) / {per_request}"

    return [
        (
            "Traffic",
            [
                timeseries(
                    "Request rate",
                    "Successful inference requests per second (nv_inference_request_success).",
                    "reqps",
                    [(per_request, "{{model}}")],
                ),
                timeseries(
                    "Failures by reason",
                    "Failed requests per second by Triton's reason "
                    "(REJECTED: queue full or timed out; CANCELED; BACKEND: execution error; "
                    "OTHER).",
                    "reqps",
                    [
                        (
                            f"sum by (model, reason) "
                            f"(rate(nv_inference_request_failure{{{SELECT}}}{RATE}))",
                            "{{model}} {{reason}}",
                        )
                    ],
                ),
                timeseries(
                    "Inferences and executions",
                    "Inferences (batch items) and model "
                    "executions per second; their ratio is the mean batch size.",
                    "ops",
                    [
                        (
                            f"sum by (model) (rate(nv_inference_count{{{SELECT}}}{RATE}))",
                            "{{model}} inferences",
                        ),
                        (
                            f"sum by (model) (rate(nv_inference_exec_count{{{SELECT}}}{RATE}))",
                            "{{model}} executions",
                        ),
                    ],
                ),
                timeseries(
                    "Pending requests",
                    "Requests accepted and not yet answered (queued or executing) "
                    "(nv_inference_pending_request_count; the HPA example scales on it).",
                    "short",
                    [
                        (
                            f"sum by (model) (nv_inference_pending_request_count{{{SELECT}}})",
                            "{{model}}",
                        )
                    ],
                ),
            ],
        ),
        (
            "Latency",
            [
                quantiles(
                    "Request latency",
                    "Arrival to response ready, successful requests "
                    "(pipeserve_request_duration_seconds).",
                    "pipeserve_request_duration_seconds",
                    "model",
                ),
                quantiles(
                    "Queue time",
                    "Time waiting in the scheduler queue before the batch "
                    "ran (pipeserve_queue_duration_seconds).",
                    "pipeserve_queue_duration_seconds",
                    "model",
                ),
                quantiles(
                    "Compute time per execution",
                    "Gather inputs, run, split outputs for "
                    "one batch (pipeserve_compute_duration_seconds).",
                    "pipeserve_compute_duration_seconds",
                    "model",
                ),
                timeseries(
                    "Mean time per request (Triton counters)",
                    "Triton's cumulative "
                    "microsecond counters divided by successful requests: where the average "
                    "request spends its time.",
                    "µs",
                    [
                        (mean_us("nv_inference_queue_duration_us"), "{{model}} queue"),
                        (mean_us("nv_inference_compute_input_duration_us"), "{{model}} input"),
                        (mean_us("nv_inference_compute_infer_duration_us"), "{{model}} infer"),
                        (mean_us("nv_inference_compute_output_duration_us"), "{{model}} output"),
                    ],
                    stack=True,
                ),
            ],
        ),
        (
            "Batching",
            [
                batch_heatmap(),
                timeseries(
                    "Mean batch size",
                    "Mean items per execution (pipeserve_batch_size sum / count).",
                    "short",
                    [
                        (
                            f"sum by (model) (rate(pipeserve_batch_size_sum{{{SELECT}}}{RATE})) / "
                            f"sum by (model) (rate(pipeserve_batch_size_count{{{SELECT}}}{RATE}))",
                            "{{model}}",
                        )
                    ],
                ),
            ],
        ),
        (
            "Pipeline stages",
            [
                quantiles(
                    "Stage compute time",
                    "One micro-batch in one pipeline stage "
                    "(pipeserve_stage_compute_duration_seconds).",
                    "pipeserve_stage_compute_duration_seconds",
                    "model, stage, device",
                ),
                quantiles(
                    "Stage transfer time",
                    "Moving one micro-batch's activations onto the "
                    "stage's device (pipeserve_stage_transfer_duration_seconds).",
                    "pipeserve_stage_transfer_duration_seconds",
                    "model, stage, device",
                ),
                timeseries(
                    "Stage utilisation",
                    "Fraction of time each stage spends computing "
                    "(rate of pipeserve_stage_busy_seconds_total). A stage far below the "
                    "others is waiting on its neighbours: rebalance the split.",
                    "percentunit",
                    [
                        (
                            f"sum by (model, stage, device) "
                            f"(rate(pipeserve_stage_busy_seconds_total{{{SELECT}}}{RATE}))",
                            "{{model}} stage {{stage}} {{device}}",
                        )
                    ],
                ),
            ],
        ),
        (
            "Models and process",
            [
                stat(
                    "Model load time",
                    "Seconds the last load of each model version took "
                    "(nv_model_load_duration_secs).",
                    "s",
                    f"max by (model, version) (nv_model_load_duration_secs{{{SELECT}}})",
                    "{{model}} v{{version}}",
                ),
                timeseries(
                    "Server memory and CPU",
                    "Resident memory of the server process and CPU cores it used.",
                    "bytes",
                    [
                        (
                            "sum by (instance) (process_resident_memory_bytes"
                            '{instance=~"$instance"})',
                            "{{instance}} resident",
                        ),
                        (
                            "sum by (instance) (rate(process_cpu_seconds_total"
                            f'{{instance=~"$instance"}}{RATE}))',
                            "{{instance}} CPU cores",
                        ),
                    ],
                ),
                timeseries(
                    "GPU utilisation",
                    "Per GPU, from NVML (nv_gpu_utilization); empty on CPU-only hosts.",
                    "percentunit",
                    [
                        (
                            'max by (instance, device) (nv_gpu_utilization{instance=~"$instance"})',
                            "{{instance}} {{device}}",
                        )
                    ],
                ),
            ],
        ),
    ]


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[Panel] = []
    y = 0
    for title, members in rows():
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        y += 1
        for i, panel in enumerate(members):
            panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}
        panels.extend(members)
        y += 8 * ((len(members) + 1) // 2)
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "uid": "pipeserve",
        "title": "pipeserve",
        "description": "Traffic, latency, batching and pipeline stages of pipeserve servers.",
        "tags": ["pipeserve", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                variable(
                    "instance", "instance", "label_values(nv_inference_request_success, instance)"
                ),
                variable("model", "model", "label_values(nv_inference_request_success, model)"),
            ]
        },
        "panels": panels,
    }


# -- reading series names back out of queries (used by the tests) ---------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")


def series_in_expr(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges, grouping clauses and numbers are removed, minus function names and keywords.
    Enough for the queries this generator writes (no `__name__` matchers, no subqueries)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if not rest.startswith("(") and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def series_in_dashboard(board: dict[str, Any]) -> dict[str, set[str]]:
    """{series name: titles of the panels or variables that query it}."""
    found: dict[str, set[str]] = {}
    for panel in board["panels"]:
        for tgt in panel.get("targets", []):
            for name in series_in_expr(tgt["expr"]):
                found.setdefault(name, set()).add(panel["title"])
    for var in board["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        for name in _LABEL_VALUES.findall(query):
            found.setdefault(name, set()).add(f"${var['name']}")
    return found


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUT} is stale: run .venv/bin/python docker/grafana/make_dashboard.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
