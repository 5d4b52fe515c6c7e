"""`pipeserve pack MODEL OUT_DIR`: rewrite an ONNX model once into the layout pipeserve maps
best (weights.bin, 64 KiB-aligned, an index beside it; weights/pack.py does the work).

onnx and onnxruntime are imported only when the command runs, so `--help` stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeserve.weights.layout import DEFAULT_ALIGNMENT, DEFAULT_INLINE_BELOW

DESCRIPTION = """Rewrite an ONNX model into the layout pipeserve maps best.

The source may keep its weights inline or in ONNX external data (any file names, any alignment).
Its tensors are streamed one at a time into OUT_DIR/weights.bin, each aligned, so a model of any
size packs in the memory of its largest tensor. Unless --no-optimize is given, onnxruntime also
optimises the graph once, here, for the CPU, and its pre-packed weights are stored beside the
others (model.cpu.onnx). An index (weights.index.json) written last lets the server check the
files before it maps them (docs/weights.md)."""


def add_pack_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `pipeserve pack` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "pack",
        help="rewrite an ONNX model into the memory-mapped layout pipeserve loads fastest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="source .onnx file (inline or external weights)")
    p.add_argument("out_dir", type=Path, help="folder to write model.onnx, weights.bin, index")
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="skip the onnxruntime CPU graph with pre-packed weights (model.cpu.onnx); "
        "weights.bin then holds one copy of the weights instead of about two",
    )
    p.add_argument(
        "--alignment",
        type=int,
        default=DEFAULT_ALIGNMENT,
        help=f"byte alignment of every tensor in weights.bin (default: {DEFAULT_ALIGNMENT})",
    )
    p.add_argument(
        "--inline-below",
        type=int,
        default=DEFAULT_INLINE_BELOW,
        help=f"initializers smaller than this stay in the graph (default: {DEFAULT_INLINE_BELOW})",
    )
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from pipeserve.errors import PipeserveError
    from pipeserve.progress import PhaseProgress
    from pipeserve.weights.pack import pack_model

    try:
        # A bar per phase on a terminal, plain lines otherwise (stderr: stdout is the report).
        with PhaseProgress("pipeserve pack") as progress:
            report = pack_model(
                args.model,
                args.out_dir,
                optimize=not args.no_optimize,
                alignment=args.alignment,
                inline_below=args.inline_below,
                on_progress=progress,
            )
    except PipeserveError as exc:
        print(f"pipeserve pack: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
