"""Start-up time of the ``zsad`` command: ``zsad --help``, ``zsad predict --help`` and the import of the entry
module, each in a fresh process (median of ``--repeats``), the way the console script runs them now (``zsad_cli``,
which parses before torch is imported) against the way it ran before (the entry imported ``zsad.cli.commands``, and with it
torch, transformers and every model: measured by importing ``zsad.detection.detector`` first).

    python benchmarks/bench_startup.py [--repeats 3]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_class_line  # noqa: E402

ENTRY = "import sys\nfrom zsad_cli import main\nsys.exit(main(sys.argv[1:]))"
OLD_ENTRY = "import zsad.detection.detector\n" + ENTRY  # what the old entry imported before it parsed anything
CASES = {
    "zsad --help": (["--help"], ENTRY, OLD_ENTRY),
    "zsad predict --help": (["predict", "--help"], ENTRY, OLD_ENTRY),
    "import of the entry module": ([], "import zsad_cli", "import zsad.cli.commands"),
}


def seconds(script: str, arguments: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script, *arguments], cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(repeats: int) -> None:
    print(cpu_class_line())
    print("| command | before (s) | after (s) | after / before |\n|---|---|---|---|")
    for name, (arguments, after, before) in CASES.items():
        old, new = seconds(before, arguments, repeats), seconds(after, arguments, repeats)
        print(f"| `{name}` | {old:.2f} | {new:.2f} | {new / old:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement; the median is shown (default 3)")
    main(parser.parse_args().repeats)
