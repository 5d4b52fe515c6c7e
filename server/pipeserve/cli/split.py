"""`pipeserve split MODEL --stages N`: print the partition plan without serving.

MODEL is an .onnx file, a folder holding model.onnx, or a model folder of a repository (its
highest numeric version is used). The plan lists, per stage, the compute nodes, the shape
arithmetic it recomputes, its weight bytes and estimated cost; and per cut, the tensors crossing
it. The graph is read without weights, so this works on models of any size.

By default node costs are FLOPs estimated from shapes, so the same model and flags print the
same plan on every run. `--cost profile` (or `auto`, what a served model uses unless its
`pipeline_cost` parameter says otherwise) times every node in a short onnxruntime run instead:
closer to real speed, but measured, so cuts can move between runs.

onnx and onnxruntime are imported only when the command runs, so `--help` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeserve.errors import PipeserveError
from pipeserve.partition.hints import DEFAULT_BATCH_HINT, DEFAULT_DIM_HINT, PROFILED_UNIT
from pipeserve.progress import PhaseProgress, format_bytes

if TYPE_CHECKING:
    from pipeserve.partition.partitioner import Plan


def add_split_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "split",
        help="print how a model would be split into pipeline stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run_split)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model.onnx, its folder, or a repository model folder")
    p.add_argument("--stages", type=int, default=2, help="number of stages (default: 2)")
    p.add_argument(
        "--cuts", default="", help="comma-separated tensors to cut after (stages - 1 names)"
    )
    p.add_argument(
        "--cost",
        choices=("estimate", "profile", "auto"),
        default="estimate",
        help="estimate: FLOPs from shapes, the same plan every run (default); profile: node "
        "times measured in a short onnxruntime run, which can move cuts between runs; auto: "
        "profile when the weights are under 2 GiB, as a served model does by default",
    )
    p.add_argument(
        "--batch-hint",
        type=int,
        default=DEFAULT_BATCH_HINT,
        help=f"size of a dynamic first dimension when costing (default: {DEFAULT_BATCH_HINT})",
    )
    p.add_argument(
        "--dim-hint",
        type=int,
        default=DEFAULT_DIM_HINT,
        help=f"size of other dynamic dimensions when costing (default: {DEFAULT_DIM_HINT})",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_split(args: argparse.Namespace) -> int:
    from pipeserve.partition.partitioner import partition_model

    try:
        path = resolve_model_path(args.model)
        cuts = [c.strip() for c in args.cuts.split(",") if c.strip()] or None
        # A bar on a terminal, plain lines otherwise; on stderr, so stdout is only the plan.
        with PhaseProgress("pipeserve split") as progress:
            plan = partition_model(
                path,
                args.stages,
                cuts=cuts,
                cost=args.cost,
                batch_hint=args.batch_hint,
                dim_hint=args.dim_hint,
                on_progress=progress,
            )
    except PipeserveError as exc:
        print(f"pipeserve split: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_summary(plan, path), indent=2))
    else:
        print(format_plan(plan, path))
    return 0


def resolve_model_path(given: Path) -> Path:
    if given.is_file():
        return given
    if (given / "model.onnx").is_file():
        return given / "model.onnx"
    versions = (
        sorted(
            (
                int(p.name)
                for p in given.iterdir()
                if p.name.isdigit() and (p / "model.onnx").exists()
            ),
            reverse=True,
        )
        if given.is_dir()
        else []
    )
    if versions:
        return given / str(versions[0]) / "model.onnx"
    raise PipeserveError(
        f"'{given}' is neither an .onnx file nor a folder holding model.onnx or version folders"
    )


def plan_summary(plan: Plan, path: Path) -> dict[str, Any]:
    return {
        "model": str(path),
        "cost_unit": plan.cost_unit,
        # False when node costs were measured: the same flags may then cut elsewhere next run.
        "reproducible": plan.cost_unit != PROFILED_UNIT,
        "stages": [
            {
                "stage": s.index,
                "compute_nodes": len(s.nodes),
                "first_node": s.nodes[0],
                "last_node": s.nodes[-1],
                "recomputed_nodes": len(s.recomputed),
                "inputs": list(s.inputs),
                "outputs": list(s.outputs),
                "weight_bytes": s.weight_bytes,
                "est_cost": s.est_cost,
            }
            for s in plan.stages
        ],
        "cuts": [
            {"after_stage": c.after_stage, "tensors": list(c.tensors), "est_bytes": c.est_bytes}
            for c in plan.cuts
        ],
    }


def format_plan(plan: Plan, path: Path) -> str:
    total = sum(s.est_cost for s in plan.stages) or 1.0
    lines = [
        f"model: {path}",
        f"stages: {len(plan.stages)}   cost: {plan.cost_unit}",
        cost_note(plan.cost_unit),
        "",
        f"{'stage':>5}  {'nodes':>6}  {'recomputed':>10}  {'weights':>10}  {'est cost':>12}  "
        f"{'share':>5}  first .. last node",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.index:>5}  {len(s.nodes):>6}  {len(s.recomputed):>10}  "
            f"{format_bytes(s.weight_bytes):>10}  {s.est_cost:>12.1f}  {s.est_cost / total:>5.0%}  "
            f"{s.nodes[0]} .. {s.nodes[-1]}"
        )
    lines.append("")
    for c in plan.cuts:
        lines.append(
            f"cut after stage {c.after_stage}: {len(c.tensors)} tensor(s), "
            f"~{format_bytes(c.est_bytes)} at the hinted input sizes"
        )
        lines.extend(f"    {name}" for name in c.tensors)
    return "\n".join(lines)


def cost_note(cost_unit: str) -> str:
    """One line saying whether the plan is reproducible (measured costs are not)."""
    if cost_unit == PROFILED_UNIT:
        return (
            "note: node costs were measured now, so cuts can move between runs; "
            "--cost estimate prints the same plan every time"
        )
    return (
        "note: a served model measures node costs at load unless its config sets "
        "pipeline_cost to estimate; --cost auto shows such a plan"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeserve split", description=__doc__)
    _add_arguments(parser)
    return run_split(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
