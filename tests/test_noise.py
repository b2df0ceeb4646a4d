"""No output the user cannot act on: the ``zsad`` command's output captured (not a terminal) holds no library
progress bar ("Loading weights", "Writing model shards"), no cursor-up escape of nested bars, no torchvision line of
the ONNX exporter; ``--verbose`` shows the libraries' bars."""

import os
import subprocess
import sys

import pytest

from zsad.data.synthetic import generate

from conftest import TEST_IMAGE_SIZE

pytestmark = pytest.mark.integration

NOISE = ("\x1b[A", "Loading weights", "Writing model shards", "Skipping torchvision")


def zsad(*arguments: str) -> str:
    """``zsad ARGUMENTS`` in a subprocess, offline, its stdout and stderr captured together (pipes: not a terminal)."""
    environment = {name: value for name, value in os.environ.items() if name != "HF_HUB_DISABLE_PROGRESS_BARS"}  # conftest's
    completed = subprocess.run([sys.executable, "-m", "zsad_cli", *arguments], capture_output=True, text=True, timeout=300,
                               env={**environment, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout + completed.stderr


def test_commands_print_no_library_bars_escapes_or_exporter_lines_unless_verbose(tmp_path):
    clip = tmp_path / "clip"
    images = generate(tmp_path / "data", categories=["disk"], num_good=2, num_defective=2, image_size=64) / "disk" / "test"
    common = ["--clip", str(clip), "--image-size", str(TEST_IMAGE_SIZE)]
    outputs = {
        "tiny-clip": zsad("tiny-clip", str(clip)),
        "predict --mutual": zsad("predict", str(images), "--model", "baseline", *common, "--mutual", "--out", str(tmp_path / "mutual")),
        "export": zsad("export", "--model", "baseline", *common, "--class-name", "disk", "--format", "onnx", "--out", str(tmp_path / "onnx")),
    }
    assert {command: [noise for noise in NOISE if noise in output] for command, output in outputs.items()} == dict.fromkeys(outputs, [])
    assert "written" in outputs["export"] and (tmp_path / "mutual" / "scores.json").is_file()
    verbose = zsad("export", "--model", "baseline", *common, "--class-name", "disk", "--format", "onnx", "--out", str(tmp_path / "again"),
                   "--verbose")
    assert "Loading weights" in verbose  # the libraries' own bars, asked for
