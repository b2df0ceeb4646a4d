"""The zsad command's start: the parser answers before torch is imported; its defaults are zsad's own."""

import json
import subprocess
import sys
import time

import pytest

import zsad_cli
import zsad_cli.choices

MODULES = "('torch', 'transformers', 'gradio', 'zsad')"
AFTER_PARSING = f"""import json, sys, zsad_cli
try:
    zsad_cli.main(sys.argv[1:])
except SystemExit as stop:
    print(json.dumps({{"code": stop.code, "loaded": [m for m in {MODULES} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("arguments", [["--help"], ["predict", "--help"], ["calibrate", "--help"], ["evaluate", "--help"],
                                       ["predict", "a.png"], ["export", "--model", "baseline"]])
def test_help_and_argument_errors_answer_without_torch(arguments):
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", AFTER_PARSING, *arguments], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == {"code": 0 if "--help" in arguments else 2, "loaded": []}
    assert "the following arguments are required" in completed.stderr or "--help" in arguments
    assert seconds < 5.0  # a loose bound for a loaded machine; benchmarks/bench_startup.py measures it


def test_import_zsad_still_registers_the_models(tiny_backbone, tmp_path):
    from zsad.runtime.loading import load_model

    from conftest import TEST_IMAGE_SIZE

    load_model("stackclip", backbone=tiny_backbone, image_size=TEST_IMAGE_SIZE).save_pretrained(tmp_path / "checkpoint")
    script = "import sys, zsad\nfrom transformers import AutoModel\nprint(type(AutoModel.from_pretrained(sys.argv[1])).__name__)"
    completed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoint")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "StackCLIPModel"


def test_the_parsers_defaults_are_zsads_own():
    from zsad.data.hf import COLUMNS
    from zsad.detection.profile import DEFAULT_MARGIN, DEFAULT_QUANTILE
    from zsad.runtime.loading import DTYPE_NAMES
    from zsad_cli.choices import PRECISIONS

    assert (zsad_cli.choices.DEFAULT_QUANTILE, zsad_cli.choices.DEFAULT_MARGIN) == (DEFAULT_QUANTILE, DEFAULT_MARGIN)
    assert zsad_cli.choices.DATASET_COLUMNS == COLUMNS
    assert set(PRECISIONS) - {"auto"} == set(DTYPE_NAMES.values())
    calibrate = zsad_cli.build_parser().parse_args(["calibrate", "--model", "baseline", "--class-name", "x", "--normal", "g",
                                                    "--out", "o"])
    # No fusion weight: the profile chooses it (docs/METHODS.md, "References on a common scale").
    assert (calibrate.quantile, calibrate.margin, calibrate.fusion_weight) == (DEFAULT_QUANTILE, DEFAULT_MARGIN, None)


@pytest.mark.parametrize("command", [["predict", "a.png", "--model", "baseline", "--out", "o"],
                                     ["calibrate", "--model", "baseline", "--class-name", "x", "--normal", "g", "--out", "o"],
                                     ["evaluate", "--model", "baseline", "--dataset", "mvtec", "--out", "o"]])
def test_every_model_command_takes_the_same_device_and_precision(command, monkeypatch):
    monkeypatch.delenv("ZSAD_DEVICE", raising=False)
    parser = zsad_cli.build_parser()
    assert (parser.parse_args(command).device, parser.parse_args(command).precision) == ("auto", "auto")
    chosen = parser.parse_args([*command, "--device", "cpu", "--precision", "int8"])
    assert (chosen.device, chosen.precision) == ("cpu", "int8")
