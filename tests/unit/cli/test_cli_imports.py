"""Imports point one way: the command line's light paths never load the heavy modules. Each case
runs in a fresh interpreter and reads `sys.modules` after the command finished."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "onnx", "numpy", "grpc", "prometheus_client", "pipeserve.app")

PROBE = """
import sys
from pipeserve.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("EXIT=" + str(code))
print("LOADED=" + ",".join(m for m in HEAVY if m in sys.modules))
"""


def _run(*argv: str) -> tuple[str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return lines.get("EXIT", "?"), {m for m in lines.get("LOADED", "").split(",") if m}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["health", "--help"],
        ["split", "--help"],
        ["pack", "--help"],
    ],
)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    code, loaded = _run(*argv)
    assert code == "0"
    assert loaded == set()


def test_health_probe_imports_grpc_but_not_onnxruntime() -> None:
    # Nothing listens on port 1: the probe answers "not serving" (exit 1) after its timeout.
    code, loaded = _run("health", "--address", "127.0.0.1:1", "--timeout", "0.5")
    assert code == "1"
    assert "grpc" in loaded
    assert not loaded & {"onnxruntime", "onnx", "numpy", "pipeserve.app"}


def test_settings_imports_nothing_heavy() -> None:
    code = f"import sys, pipeserve.settings; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
