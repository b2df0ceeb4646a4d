"""Running train/train.py (and Accelerate launches of it) in an offline subprocess, for the tests."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from zsad.space.testing import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train" / "train.py"


def training_arguments(method: str, clip, root, output_dir, epochs: int, image_size: int, batch_size: int, *extra: str) -> list[str]:
    """train/train.py's arguments for a CPU run on an MVTec-layout dataset."""
    return [
        "--method", method, "--clip", str(clip), "--train-dataset", "mvtec", "--train-root", str(root),
        "--output-dir", str(output_dir), "--epochs", str(epochs), "--batch-size", str(batch_size),
        "--image-size", str(image_size), "--cpu", *extra,
    ]


class CommandHung(AssertionError):
    """A command ran past its time limit; the message holds its output and every Python process's stacks."""


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
        abort_process_tree(process.pid)
        stdout, stderr = process.communicate(timeout=60)
        raise CommandHung(f"{command[:4]}... ran past {timeout:.0f} s; stacks at that moment:\n"
                          f"{stdout[-2000:]}{_without_module_lists(stderr)[-12000:]}") from None
    assert process.returncode == 0, stdout[-2000:] + _without_module_lists(stderr)[-12000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _without_module_lists(stderr: str) -> str:
    """faulthandler follows each crash's stacks with a long 'Extension modules:' line; drop it to keep the stacks."""
    return "\n".join(line for line in stderr.splitlines() if not line.lstrip().startswith("Extension modules:"))


def abort_process_tree(pid: int) -> None:
    """SIGABRT to ``pid`` and every descendant: torchrun starts its workers in sessions of their own, so the
    launcher's process group does not reach them."""
    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGABRT)


# Two processes on one machine talk over loopback only, whatever the host name resolves to.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
GLOO_PROBE = """
import torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
ranks = accelerator.gather(torch.tensor([accelerator.process_index]))
accelerator.wait_for_everyone()
assert ranks.tolist() == [0, 1], ranks
accelerator.end_training()
"""


def two_process_launcher() -> list[str]:
    """accelerate's torchrun launcher for 2 CPU processes on a free port (a script's --cpu or
    ACCELERATE_USE_CPU makes them join over gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


def skip_unless_gloo_works(workdir: Path) -> None:
    """Skip the calling test if two bare processes cannot exchange a tensor over gloo on this machine."""
    probe = workdir / "gloo_probe.py"
    probe.write_text(GLOO_PROBE)
    try:
        run_command([*two_process_launcher(), str(probe)], timeout=90, extra_env=LOOPBACK_ENV)
    except AssertionError as failure:  # a hang (CommandHung) or an error; the probe uses no zsad code
        pytest.skip(f"two processes cannot exchange a tensor over gloo on this machine:\n{failure}")
