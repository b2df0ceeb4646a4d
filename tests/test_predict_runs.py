"""``zsad predict`` over folders: records streamed to disk, interrupted runs resumed without redoing finished images,
and the images shared between processes under ``accelerate launch`` with one merged ``scores.json``."""

import json

import numpy as np
import pytest
from PIL import Image

from zsad.inference import AnomalyDetector
from zsad.predict import predict_files, read_records

from conftest import TEST_IMAGE_SIZE
from image_files import random_rgb
from train_script import LOOPBACK_ENV, run_command

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    for index in range(NUM_IMAGES):
        Image.fromarray(random_rgb(20 + index, 60 + 4 * index, 50)).save(folder / f"part{index}.png")
    return folder


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(methods=["baseline"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="module")
def uninterrupted(detector, parts, tmp_path_factory):
    return predict_files(detector, [parts], "bottle", tmp_path_factory.mktemp("whole"), batch_size=2)


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_without_redoing_finished_images(detector, parts, uninterrupted, tmp_path, monkeypatch):
    scored = []
    original = detector.detect_batch

    def interrupted_after_one_batch(images, *args, **kwargs):
        if scored:
            raise Interrupted
        scored.append(len(images))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(detector, "detect_batch", interrupted_after_one_batch)
    with pytest.raises(Interrupted):
        predict_files(detector, [parts], "bottle", tmp_path, batch_size=2)
    assert [record["image"] for record in read_records(tmp_path)] == [str(parts / "part0.png"), str(parts / "part1.png")]
    assert not (tmp_path / "scores.json").exists() and (tmp_path / "part1_overlay.png").is_file()
    with open(tmp_path / "records-0.jsonl", "a") as stream:
        stream.write('{"image": "cut short by the interrup')  # a line the interruption left unfinished

    resumed = []
    monkeypatch.setattr(detector, "detect_batch", lambda images, *a, **k: resumed.extend(images) or original(images, *a, **k))
    summary = predict_files(detector, [parts], "bottle", tmp_path, batch_size=2, resume=True)
    assert [loaded.image.size for loaded in resumed] == [(60 + 4 * i, 50) for i in (2, 3, 4)]  # parts 2-4 only
    assert summary == json.loads((tmp_path / "scores.json").read_text())
    assert_same_records(summary, uninterrupted)

    # without --resume, the old records go and everything is done again
    resumed.clear()
    predict_files(detector, [parts], "bottle", tmp_path, batch_size=2)
    assert len(resumed) == NUM_IMAGES and len(read_records(tmp_path)) == NUM_IMAGES


def assert_same_records(summary: dict, reference: dict) -> None:
    assert [record["image"] for record in summary["images"]] == [record["image"] for record in reference["images"]]
    for record, expected in zip(summary["images"], reference["images"]):
        assert record["overlay"] == expected["overlay"] and record["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_two_processes_share_the_images_and_merge_one_scores_json(two_process_launcher, tiny_clip_path, parts, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_command([*two_process_launcher(), "--module", "zsad", "predict", str(parts), "--model", "baseline", "--clip", str(tiny_clip_path),
                 "--image-size", str(TEST_IMAGE_SIZE), "--class-name", "bottle", "--out", str(out), "--device", "cpu", "--precision", "float32",
                 "--batch-size", "2"], extra_env=LOOPBACK_ENV)
    per_process = {path.name: len(path.read_text().splitlines()) for path in out.glob("records-*.jsonl")}
    assert per_process == {"records-0.jsonl": 3, "records-1.jsonl": 2}
    summary = json.loads((out / "scores.json").read_text())
    assert_same_records(summary, uninterrupted)
    for record in summary["images"]:
        size = Image.open(record["image"]).size
        assert Image.open(out / record["overlay"]).size == size and np.asarray(Image.open(out / record["mask"])).shape == size[::-1]


def test_under_two_processes_mutual_scoring_shares_whole_groups(two_process_launcher, tiny_clip_path, detector, parts, tmp_path):
    out = tmp_path / "out"
    run_command([*two_process_launcher(), "--module", "zsad", "predict", str(parts), "--model", "baseline", "--clip", str(tiny_clip_path),
                 "--image-size", str(TEST_IMAGE_SIZE), "--out", str(out), "--device", "cpu", "--precision", "float32", "--mutual"],
                extra_env=LOOPBACK_ENV)
    records = json.loads((out / "scores.json").read_text())["images"]
    paths = sorted(parts.iterdir())
    expected = detector.detect_mutual(paths, "object")  # five images are one group: one process scores it whole
    assert [record["details"]["compared_with"] for record in records] == [4] * 5
    assert [len((out / f"records-{i}.jsonl").read_text().splitlines()) for i in (0, 1)] == [5, 0]
    assert [record["score"] for record in records] == pytest.approx([result.score for result in expected], abs=1e-5)


def test_display_side_bounds_what_predict_writes(detector, parts, tmp_path):
    summary = predict_files(detector, [parts / "part4.png"], "bottle", tmp_path, display_side=40)
    assert Image.open(tmp_path / summary["images"][0]["overlay"]).size == (40, 26)  # 76 x 50 scaled by 40/76
    tiled = predict_files(detector, [parts / "part4.png"], "bottle", tmp_path / "tiles", tiles=True)
    assert tiled["images"][0]["tiles"] == 1 and Image.open(tmp_path / "tiles" / "part4_mask.png").size == (76, 50)
