"""The committed code in server/pipeserve/api/generated/ matches what proto/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
GENERATOR = REPO_ROOT / "scripts" / "gen_proto.py"


def test_generated_code_is_fresh() -> None:
    # Runs the generator's own --check (regenerate into a temp dir, compare byte for byte), so
    # the test and the documented command can never disagree about what "stale" means. The
    # script runs the pinned grpcio-tools from .venv-protoc/, installing it there on first use.
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
