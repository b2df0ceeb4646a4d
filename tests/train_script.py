"""train/train.py for the tests: the script as a module (train/ is a script folder, not a package) and a
runner for it (and Accelerate launches of it) in an offline subprocess."""

import importlib.util
import os
import signal
import subprocess
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train" / "train.py"


class CommandHung(AssertionError):
    """A command ran past its time limit; the message holds its output and every Python process's stacks."""


@cache
def load_train_script():
    spec = importlib.util.spec_from_file_location("zsad_train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_command(command: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root, offline and quiet; fail with its output if it fails.

    The time limit stays below pytest-timeout's so that a hang is reported with the stacks of the command's
    processes (faulthandler prints them on SIGABRT) instead of only the test's own stack."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "PYTHONFAULTHANDLER": "1", **(extra_env or {})}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        stdout, stderr = process.communicate(timeout=60)
        raise CommandHung(f"{command[:4]}... ran past {timeout:.0f} s; stacks at that moment:\n"
                          f"{stdout[-2000:]}{stderr[-12000:]}") from None
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
