"""train/train.py for the tests: the script as a module (train/ is a script folder, not a package) and a
runner for it (and Accelerate launches of it) in an offline subprocess."""

import importlib.util
import os
import subprocess
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train" / "train.py"


@cache
def load_train_script():
    spec = importlib.util.spec_from_file_location("zsad_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_command(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root, offline and quiet; fail with its output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
