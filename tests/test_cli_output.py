"""What the zsad commands say when they finish, and that the next steps they print run as printed."""

import argparse
import json
import shlex
from pathlib import Path

import pytest
from PIL import Image

from zsad.cli.summaries import predict_summary
from zsad.runtime.loading import Runtime
from zsad_cli import build_parser, main

from conftest import TEST_IMAGE_SIZE


def printed_command(text: str, program: str) -> list[str]:
    """The arguments of the first ``program ...`` command in ``text`` (up to the line end or a closing backquote)."""
    start = text.index(f"{program} ")
    line = text[start:].splitlines()[0].split("`")[0]
    return shlex.split(line)[1:]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colour in enumerate(["red", "navy", "white"]):
        Image.new("RGB", (80, 60), colour).save(folder / f"part{index}.png")
    return folder


def test_tiny_clip_says_what_it_wrote_and_its_example_runs_as_printed(tmp_path, images, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tiny-clip", str(tmp_path / "tiny")]) == 0
    printed = capsys.readouterr().out
    assert f"to {tmp_path / 'tiny'}: " in printed and "config.json" in printed and "tokenizer_config.json" in printed
    arguments = printed_command(printed, "zsad predict")
    assert main([arguments[0], str(images), *arguments[2:]]) == 0  # IMAGE given
    assert {path.name for path in (tmp_path / "predictions").iterdir()} >= {"scores.json", "part0_overlay.png", "part2_mask.png"}


def test_predict_ends_with_counts_threshold_score_range_and_where_the_files_are(tiny_clip_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(images), "--model", "baseline", "--clip", str(tiny_clip_path), "--class-name", "bottle",
                 "--image-size", str(TEST_IMAGE_SIZE), "--threshold", "0.5", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    values = [record["score"] for record in scores["images"]]
    anomalous = sum(record["verdict"] == "anomalous" for record in scores["images"])
    printed = capsys.readouterr().out
    precision = Runtime.resolve("cpu", "auto").precision  # the CLI's default, named in the summary
    assert f"3 images scored with baseline (training-free) on a tiny random CLIP (noise), {precision} on CPU, " \
           f"{TEST_IMAGE_SIZE} px as 'bottle': {anomalous} anomalous, {3 - anomalous} normal at " \
           "image threshold 0.500 (uncalibrated (threshold 0.5 set by hand))." in printed
    assert "Warning: the backbone is a tiny random CLIP (zsad tiny-clip / --tiny): its scores and maps are noise" in printed
    block = scores["provenance"]
    assert all(record["provenance"] == block for record in scores["images"])  # one block for the run, in every record
    assert (block["method"], block["status"], block["precision"], block["image_size"]) == (
        "baseline", "training-free", precision, TEST_IMAGE_SIZE)
    assert block["backbone"]["tiny_random"] and block["backbone"]["shape"]["vision_layers"] == 4
    assert block["threshold_rule"] == {"rule": "uncalibrated (threshold 0.5 set by hand)", "image": 0.5, "pixel": 0.5}
    assert f"Image scores from {min(values):.3f} to {max(values):.3f}; highest first: " in printed
    assert f"scores.json are in {out}" in printed


def test_an_uncalibrated_untrained_run_gives_scores_and_a_rank_but_no_verdict(tiny_clip_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(images), "--model", "stackclip", "--clip", str(tiny_clip_path), "--class-name", "bottle",
                 "--image-size", str(TEST_IMAGE_SIZE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    assert "anomalous" not in printed and " normal" not in printed
    assert "'bottle': no verdict: the default threshold means nothing for an untrained or training-free method" in printed
    assert "references of good parts (zsad calibrate, a profile), use a trained checkpoint, or set a threshold" in printed
    ranked = sorted(scores["images"], key=lambda record: record["score"], reverse=True)
    assert "highest first: " + ", ".join(f"{Path(r['image']).name} ({r['score']:.3f})" for r in ranked) + "." in printed
    assert (scores["gives_verdict"], scores["threshold"]) == (False, None)
    assert {record["verdict"] for record in scores["images"]} == {"none"}


def summary_of(fractions: list[float]) -> dict:
    records = [{"image": f"{i}.png", "score": 0.2 + 0.3 * i, "verdict": "anomalous" if i else "normal",
                "anomalous_pixel_fraction": fraction} for i, fraction in enumerate(fractions)]
    block = {"method": "stackclip", "status": "untrained", "precision": "float32", "device": "cpu", "image_size": 518,
             "backbone": {"tiny_random": False, "shape": {"vision_layers": 24, "vision_width": 1024, "patch_size": 14,
                                                          "native_image_size": 336}},
             "product": {"given": "Nut", "used": "nut"}}
    return {"method": "stackclip", "status": "untrained", "class_name": "nut", "threshold": 0.4, "pixel_threshold": 0.45,
            "calibration": "uncalibrated (threshold 0.4 set by hand)", "provenance": block, "gives_verdict": True,
            "verdict_line": "image threshold 0.400 (uncalibrated (threshold 0.4 set by hand))",
            "images": records + [{"image": "broken.png", "error": "not an image"}]}


def test_predict_notes_when_every_mask_is_white(tmp_path):
    white = predict_summary(summary_of([1.0, 1.0]), tmp_path)
    assert white.startswith("2 images scored with stackclip (untrained) on CLIP ViT-L/14@336, float32 on CPU, 518 px as 'nut' "
                            "(given as 'Nut'): 1 anomalous, 1 normal at image threshold 0.400")
    assert "Image scores from 0.200 to 0.500; highest first: 1.png (0.500), 0.png (0.200)." in white
    assert "every mask is white: each pixel of each image reached the pixel threshold 0.450" in white
    assert "white" not in predict_summary(summary_of([1.0, 0.25]), tmp_path)


def test_the_next_step_export_prints_runs_as_printed(tiny_clip_path, images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE),
                 "--class-name", "bottle", "--class-name", "nut", "--format", "onnx", "--out", "graph dir"]) == 0
    arguments = printed_command(capsys.readouterr().out, "zsad predict")
    assert arguments[1] == "IMAGE"
    assert main([arguments[0], str(images / "part0.png"), *arguments[2:]]) == 0
    assert json.loads((tmp_path / "predictions" / "scores.json").read_text())["class_name"] == "bottle"


def options_without_help_or_default(parser: argparse.ArgumentParser, command: str = "zsad") -> list[str]:
    """'command --option' for each option whose help (as the parser's formatter writes it) is missing or does not state
    its (non-empty) default."""
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                missing += options_without_help_or_default(subparser, f"{command} {name}")
        elif not isinstance(action, argparse._HelpAction):
            default = action.default
            has_default = default not in (None, False, [], (), argparse.SUPPRESS)
            if not action.help or (has_default and "default" not in formatter._get_help_string(action)):
                missing.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    from train import train as train_script  # train/ is a script folder; the repository root is on sys.path

    assert options_without_help_or_default(build_parser()) == []
    assert options_without_help_or_default(train_script.build_parser(), "train.py") == []
