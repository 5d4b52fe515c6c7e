"""`pipeserve split`: the plan printed for a model file, folder or repository model folder."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeserve.cli.split import add_split_parser, main
from tests.fixtures import graphs


def test_prints_stages_and_cut_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(graphs.torch_model("encoder")), "--stages", "4", "--cost", "estimate"]) == 0
    out = capsys.readouterr().out
    assert "cost: flops (estimated)" in out
    assert out.count("cut after stage") == 3
    assert "/blocks.0/Add_3_output_0" in out


def test_json_plan_from_a_repository_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for version in ("1", "3"):
        (tmp_path / "mlp" / version).mkdir(parents=True)
        shutil.copy(graphs.torch_model("mlp"), tmp_path / "mlp" / version / "model.onnx")
    assert main([str(tmp_path / "mlp"), "--stages", "2", "--cost", "estimate", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"].endswith("mlp/3/model.onnx")
    assert [s["stage"] for s in plan["stages"]] == [0, 1]
    assert sum(s["compute_nodes"] for s in plan["stages"]) == 13
    assert sum(s["weight_bytes"] for s in plan["stages"]) > 0
    assert len(plan["cuts"]) == 1 and plan["cuts"][0]["tensors"]


def test_bad_cut_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(graphs.torch_model("mlp")), "--stages", "2", "--cuts", "nope"])
    assert code == 2
    assert "cut tensor 'nope' is not in the graph" in capsys.readouterr().err


def test_registers_as_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="pipeserve")
    add_split_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["split", "m.onnx", "--stages", "3"])
    assert args.stages == 3 and args.func.__name__ == "run_split"


def _split(*args: str) -> str:
    # A fresh process per run: the plan must not depend on anything a previous run left behind.
    result = subprocess.run(
        [sys.executable, "-m", "pipeserve", "split", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # Progress goes to stderr (here a pipe: one plain line), the plan alone to stdout.
    done = r"pipeserve split: planning: done \(4 of 4 steps\), [\d.]+ s\n"
    assert re.fullmatch(done, result.stderr), result.stderr
    return result.stdout


def test_default_plan_is_the_same_on_every_run() -> None:
    encoder = str(graphs.torch_model("encoder"))
    first, second = _split(encoder, "--stages", "4"), _split(encoder, "--stages", "4")
    assert first == second
    assert "cost: flops (estimated)" in first
    as_json = [json.loads(_split(encoder, "--stages", "3", "--json")) for _ in range(2)]
    assert as_json[0] == as_json[1]
    assert as_json[0]["reproducible"] is True


def test_measured_plan_says_it_can_move(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(graphs.torch_model("encoder")), "--stages", "4", "--cost", "profile"]) == 0
    out = capsys.readouterr().out
    assert "cost: us (profiled)" in out
    assert "cuts can move between runs; --cost estimate prints the same plan" in out
    assert (
        main([str(graphs.torch_model("mlp")), "--stages", "2", "--cost", "profile", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["reproducible"] is False
