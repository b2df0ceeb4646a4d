"""The ``zsad`` command: ``zsad predict | evaluate | publish | tiny-clip``."""

import argparse
import sys

from .errors import ZSADError


def _tiny_clip(args: argparse.Namespace) -> None:
    from .testing import save_tiny_clip

    print(save_tiny_clip(args.directory, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="Zero-shot industrial anomaly detection with CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-clip", help="write a tiny random CLIP for offline tests and UI work")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_clip)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ZSADError as error:
        print(f"zsad {args.command}: {error}", file=sys.stderr)
        return 2
    return 0
