"""An output folder belongs to one run: ``--resume`` continues only that run, a second process is refused while one
writes, output names are unique per input, and ``scores.json`` points each image at its own files."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from zsad import AnomalyDetector, ZSADError
from zsad.cli.predict import _output_names, predict_files, read_records
from zsad.cli.runs import RUN_FILE
from zsad.cli.summaries import predict_summary

from conftest import TEST_IMAGE_SIZE
from image_files import random_rgb


@pytest.fixture(scope="module")
def detectors(tiny_backbone):
    return {method: AnomalyDetector.load(methods=[method], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)
            for method in ("baseline", "stackclip")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    for index in range(3):
        Image.fromarray(random_rgb(index, 40 + 4 * index, 36)).save(folder / f"part{index}.png")
    return folder


@pytest.fixture
def first_run(detectors, parts, tmp_path):
    """A finished baseline run for 'bottle' at threshold 0.4 in tmp_path / "out"."""
    out = tmp_path / "out"
    predict_files(detectors["baseline"], [parts], "bottle", out, threshold=0.4)
    return out


@pytest.mark.parametrize(("method", "class_name", "threshold", "named"), [
    ("baseline", "screw", 0.4, 'product: {"given": "bottle", "used": "bottle"} then, {"given": "screw", "used": "screw"} now'),
    ("baseline", "bottle", 0.6, '"image": 0.4, "pixel": 0.4} then, '),
    ("stackclip", "bottle", 0.4, 'method: "baseline" then, "stackclip" now'),
])
def test_resume_refuses_another_run_and_names_what_differs(detectors, parts, first_run, method, class_name, threshold, named):
    before = (first_run / "scores.json").read_text()
    with pytest.raises(ZSADError, match="Give a new --out") as raised:
        predict_files(detectors[method], [parts], class_name, first_run, threshold=threshold, resume=True)
    assert named in str(raised.value)
    assert (first_run / "scores.json").read_text() == before  # nothing of the first run was touched


def test_resume_of_the_same_run_reuses_its_records_and_says_so(detectors, parts, first_run, capsys):
    (first_run / "scores.json").unlink()
    records = first_run / "records-0.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[:2]))  # the run was killed after two images
    summary = predict_files(detectors["baseline"], [parts], "bottle", first_run, threshold=0.4, resume=True)
    assert summary["reused"] == 2 and len(summary["images"]) == 3
    assert "1 scored now, 2 reused from the interrupted run." in predict_summary(summary, first_run)


def test_a_new_run_without_resume_takes_the_folder_over(detectors, parts, first_run):
    summary = predict_files(detectors["stackclip"], [parts], "screw", first_run)
    owner = json.loads((first_run / RUN_FILE).read_text())
    assert owner["provenance"]["product"]["used"] == "screw" and owner["provenance"]["method"] == "stackclip"
    assert [record["score"] for record in read_records(first_run)] == [record["score"] for record in summary["images"]]
    assert "reused" not in summary


def test_results_without_a_run_record_are_not_resumed(detectors, parts, first_run):
    (first_run / RUN_FILE).unlink()  # as a folder written by an older zsad
    with pytest.raises(ZSADError, match="no run.json saying which run made them"):
        predict_files(detectors["baseline"], [parts], "bottle", first_run, threshold=0.4, resume=True)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from zsad.cli.runs import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(detectors, parts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ZSADError, match="Another zsad process is writing to"):
            predict_files(detectors["baseline"], [parts], "bottle", out)
        assert not (out / "scores.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert len(predict_files(detectors["baseline"], [parts], "bottle", out)["images"]) == 3  # the lock died with it


def test_output_names_are_unique_per_input_case_insensitively(tmp_path):
    paths = [tmp_path / name for name in ("x.jpg", "x.png", "x_1.png", "a/Y.png", "b/y.png", "c/x.png", "z.png")]
    assert _output_names(paths) == ["x.jpg", "x.png", "x_1", "Y.png", "y.png (2)", "x.png (2)", "z"]


def test_each_record_points_at_its_own_files(detectors, tmp_path):
    sizes = {"x.jpg": (40, 30), "x.png": (44, 32), "x_1.png": (48, 34)}
    for seed, (name, size) in enumerate(sizes.items()):
        Image.fromarray(random_rgb(seed, *size)).save(tmp_path / name)
    summary = predict_files(detectors["baseline"], [tmp_path / name for name in sizes], "bottle", tmp_path / "out")
    overlays = [record["overlay"] for record in summary["images"]]
    assert len(set(overlays)) == 3
    for record in summary["images"]:
        size = sizes[os.path.basename(record["image"])]
        assert Image.open(tmp_path / "out" / record["overlay"]).size == size
        assert Image.open(tmp_path / "out" / record["mask"]).size == size
        original = np.asarray(Image.open(record["image"]).convert("RGB"), dtype=float)
        overlay = np.asarray(Image.open(tmp_path / "out" / record["overlay"]).convert("RGB"), dtype=float)
        assert np.corrcoef(original.ravel(), overlay.ravel())[0, 1] > 0.3  # the overlay is of this image


@pytest.mark.integration
def test_ctrl_c_on_predict_ends_with_one_line_saying_what_was_kept(tiny_clip_path, tmp_path):
    for index in range(40):
        Image.fromarray(random_rgb(index, 64, 64)).save(tmp_path / f"part{index:02d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "zsad", "predict", str(tmp_path), "--model", "baseline", "--clip", str(tiny_clip_path),
               "--class-name", "bottle", "--image-size", str(TEST_IMAGE_SIZE), "--batch-size", "1", "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd(), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    records = out / "records-0.jsonl"
    while process.poll() is None and (not records.is_file() or records.read_text().count("\n") < 2):
        pass
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # not the progress bar
    kept = len(read_records(out))
    assert lines == [f"zsad predict: interrupted; the results of {kept} images are kept in {out.resolve()}. "
                     "Run the same command with --resume to score the rest."]
    assert 2 <= kept < 40
