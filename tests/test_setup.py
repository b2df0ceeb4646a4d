"""The README's set-up command, run as a new user runs it: a fresh virtual environment, then every documented
command. And requirements.txt stays installable the way the Hub builds the Space (the file alone, before the
repository is copied in)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def readme_setup_command() -> str:
    """The README's set-up command for the app: ``<pip install ...> && python app.py``."""
    commands = re.findall(r"^(pip install [^\n]*) && python app\.py$", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    assert len(commands) == 1, "the README has one set-up command for the app"
    return commands[0]


def test_requirements_hold_only_named_packages_so_the_space_build_can_install_them():
    """The Hub's Space build runs ``pip install -r /tmp/requirements.txt`` with the file alone, before the repository
    is copied in: a local path (``.``, ``-e .``) there would fail the build."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]  # raises on paths, URLs and options
    assert requirements and all(requirement.url is None for requirement in requirements)
    assert "torch" in {requirement.name for requirement in requirements}


def run(command: list[str], venv: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PIP_NO_COMPILE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_every_documented_command_works_after_the_readme_setup_in_a_fresh_venv(tmp_path):
    """About 1-2.5 minutes: pip installs the pinned torch and the rest from its local wheel cache (byte-compiling
    is left out: it only costs CPU)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no system site-packages
    started = time.monotonic()
    run(["bash", "-c", readme_setup_command()], venv, REPO, timeout=780)
    print(f"README set-up in a fresh venv: {time.monotonic() - started:.0f} s")

    assert "predict" in run(["zsad", "--help"], venv, tmp_path).stdout
    clip = tmp_path / "tiny-clip"
    run(["zsad", "tiny-clip", str(clip)], venv, tmp_path)
    example = REPO / "examples" / "wood_scratch.png"
    run(["zsad", "predict", "--model", "baseline", "--clip", str(clip), "--class-name", "wood", "--image-size", "112",
         str(example), "--out", str(tmp_path / "out")], venv, tmp_path)
    assert (tmp_path / "out" / "scores.json").is_file() and (tmp_path / "out" / "wood_scratch_overlay.png").is_file()
    assert "--method" in run(["python", str(REPO / "train" / "train.py"), "--help"], venv, tmp_path).stdout
    launched = run(["accelerate", "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    str(REPO / "train" / "train.py"), "--help"], venv, tmp_path)
    assert "--method" in launched.stdout
