"""Evaluate a model on a benchmark with the paper protocol (see zsad/evaluation/protocol.py).

    python train/evaluate.py --model baseline --dataset visa --root /data/visa --out results/
    accelerate launch --num_processes 2 train/evaluate.py --model ORG/stackclip --dataset mvtec --root /data/mvtec --out results/
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing zsad

from zsad import ZSADError  # noqa: E402
from zsad.cli.commands import evaluate  # noqa: E402
from zsad_cli import add_evaluation_arguments  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(parser)
    try:
        evaluate(parser.parse_args())
    except ZSADError as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
