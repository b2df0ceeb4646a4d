"""``zsad predict``'s own checks: resumed records are validated line by line, ``--out`` must be a folder, and only
files are taken for images."""

import json
from pathlib import Path

import pytest
from PIL import Image

from zsad import AnomalyDetector, ZSADError
from zsad.cli.predict import predict_files, read_records
from zsad.runtime.images import image_files

from conftest import TEST_IMAGE_SIZE
from image_files import random_rgb

NUM_IMAGES = 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    for index in range(NUM_IMAGES):
        Image.fromarray(random_rgb(index, 40 + 4 * index, 40)).save(folder / f"part{index}.png")
    (folder / "folder.png").mkdir()  # a folder with an image's name is no image
    return folder


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


def test_only_files_are_images(parts):
    assert [path.name for path in image_files([parts])] == [f"part{index}.png" for index in range(NUM_IMAGES)]


def test_resume_ignores_every_invalid_record_with_a_warning_naming_its_line(detector, parts, tmp_path, monkeypatch):
    predict_files(detector, [parts], "bottle", tmp_path, batch_size=2)
    records = tmp_path / "records-0.jsonl"
    lines = records.read_bytes().splitlines()
    first = json.loads(lines[0])
    without_score = {key: value for key, value in json.loads(lines[1]).items() if key != "score"}
    text_score = {**json.loads(lines[2]), "score": "0.9"}
    records.write_bytes(b"\n".join([
        lines[0],                                   # line 1: valid, kept
        b"\xff\xfe not utf-8",                      # line 2
        b"[1, 2, 3]",                               # line 3
        json.dumps(without_score).encode(),         # line 4
        json.dumps(text_score).encode(),            # line 5
        json.dumps({"score": 0.5}).encode(),        # line 6
        b'{"image": "cut short',                    # line 7
    ]))
    redone = []
    original = detector.detect_batch
    monkeypatch.setattr(detector, "detect_batch", lambda images, *a, **k: redone.extend(images) or original(images, *a, **k))
    with pytest.warns(UserWarning) as caught:
        summary = predict_files(detector, [parts], "bottle", tmp_path, batch_size=2, resume=True)
    messages = [str(warning.message) for warning in caught]
    for number, problem in [(2, "not UTF-8 text"), (3, "not a JSON object"), (4, "no score"), (5, "no numeric score"),
                            (6, "no image path"), (7, "not JSON; cut short?")]:
        assert f"records-0.jsonl line {number} ignored ({problem}); its image is done again." in messages
    assert len(redone) == NUM_IMAGES - 1  # every image but the one with a valid record
    assert [record["image"] for record in summary["images"]] == [str(parts / f"part{index}.png") for index in range(NUM_IMAGES)]
    assert summary["images"][0] == first and all(isinstance(record["score"], float) for record in summary["images"])
    with pytest.warns(UserWarning) as again:  # the invalid lines stay in the file, ignored again
        assert all("score" in record for record in read_records(tmp_path))
    assert len(again) == 6


def test_out_that_is_a_file_is_a_clear_error(detector, parts, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("a file")
    with pytest.raises(ZSADError, match="The output folder '.*results' is a file; give --out a folder"):
        predict_files(detector, [parts], "bottle", taken)
    assert Path(taken).read_text() == "a file"
