"""pipeserve's command line: `pipeserve serve | health | split | pack`.

serve.py builds `serve`'s flags from the settings table; health.py is the probe; the offline
tools (`split`, `pack`) add their own parsers. Heavy modules (onnxruntime, the server) are
imported only by the subcommand that runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeserve import __version__
from pipeserve.cli.health import add_health_parser
from pipeserve.cli.pack import add_pack_parser
from pipeserve.cli.serve import add_serve_parser
from pipeserve.cli.split import add_split_parser

DESCRIPTION = (
    "pipeserve: an inference server for ONNX models that speaks the KServe v2 / Triton gRPC "
    "protocol. `pipeserve serve` serves a Triton-layout model repository; `pipeserve split` and "
    "`pipeserve pack` prepare models offline."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeserve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pipeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_health_parser(sub)
    add_split_parser(sub)
    add_pack_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
