"""A lot scored group by group (zsad.detection.mutual.detect_mutual_groups, `zsad predict --mutual`): groups fixed from the
files' bytes whatever their order or the number of processes, a killed run resumed at its next group with the same
scores, a one-group lot scored as the mutual arithmetic says (smoothed map, its maximum, RsCIN when asked)."""

import json
import random
import shutil
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from zsad import AnomalyDetector, ZSADError
from zsad.cli.predict import predict_files
from zsad.detection.mutual import (
    MutualSettings,
    content_key,
    detect_mutual,
    detect_mutual_groups,
    group_id,
    lot_groups,
    lot_keys,
    map_image_scores,
    mutual_scores,
    rescore,
    score_group,
    standardise,
    to_unit,
)
from zsad.detection.visualize import overlay_heatmap
from zsad.modeling.image_processing_zsad import resize_map
from zsad.runtime.images import read_image
from zsad_cli import main

IMAGE_SIZE = 56
LOT = 12
SETTINGS = MutualSettings(max_compared=3, degrees=(1, 3))  # the lot is three groups of four


@pytest.fixture(scope="module")
def detector(tiny_clip_path):
    return AnomalyDetector.load(methods=["baseline"], clip=str(tiny_clip_path), image_size=IMAGE_SIZE, device="cpu", precision="float32")


def part(seed: int, defect: bool = False) -> Image.Image:
    """A striped plate with a little noise of its own; ``defect``: a dark square."""
    rng = np.random.default_rng(seed)
    pixels = np.full((64, 72, 3), 180, dtype=np.int16)
    pixels[::8] = 90
    pixels += rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
    if defect:
        pixels[20:36, 24:40] = 0
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def lot(tmp_path_factory):
    """A folder of LOT parts, every sixth defective, and one exact copy of a file under another name."""
    folder = tmp_path_factory.mktemp("lot")
    for i in range(LOT - 1):
        part(i, defect=i % 6 == 5).save(folder / f"{i:03d}.png")
    shutil.copyfile(folder / "005.png", folder / "copy_of_005.png")
    return folder


def path_groups(paths) -> list[set[str]]:
    keys = lot_keys(paths)
    return [{str(paths[i]) for i in group} for group in lot_groups(keys, SETTINGS, [str(p) for p in paths])]


def test_groups_depend_on_the_files_not_on_their_order(lot):
    paths = sorted(lot.iterdir())
    groups = path_groups(paths)
    assert [len(group) for group in groups] == [4, 4, 4]
    assert sorted(p for group in groups for p in group) == sorted(map(str, paths))
    shuffled = paths.copy()
    random.Random(3).shuffle(shuffled)
    assert sorted(map(sorted, path_groups(shuffled))) == sorted(map(sorted, groups))
    # the copy and its original are never compared with each other: they land in different groups
    assert not any({str(lot / "005.png"), str(lot / "copy_of_005.png")} <= group for group in groups)


class ThreadProcess:
    """Accelerate's ``PartialState`` as ``predict_files`` uses it, for one of ``count`` processes run as threads that
    share one model; each scores its share while holding ``turn``, one after the other."""

    def __init__(self, index: int, count: int, barrier: threading.Barrier, turn: threading.Lock):
        self.process_index, self.num_processes, self.barrier, self.turn = index, count, barrier, turn
        self.is_main_process = self.is_local_main_process = index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait()

    @contextmanager
    def split_between_processes(self, items):
        share = -(-len(items) // self.num_processes)  # contiguous shares, as Accelerate splits a list
        with self.turn:
            yield items[self.process_index * share:(self.process_index + 1) * share]


def scored(out) -> dict[str, tuple]:
    """Each image's (score, verdict, group) in ``out``'s scores.json."""
    summary = json.loads((out / "scores.json").read_text())
    return {record["image"]: (record["score"], record["verdict"], record["group"]) for record in summary["images"]}


def one_process() -> ThreadProcess:
    return ThreadProcess(0, 1, threading.Barrier(1), threading.Lock())


def predicted(detector, folder, out, resume: bool = False) -> dict[str, tuple]:
    predict_files(detector, [folder], "object", out, mutual=True, mutual_settings=SETTINGS, resume=resume, state=one_process())
    return scored(out)


def test_two_processes_share_whole_groups_and_score_them_as_one_process(detector, lot, tmp_path):
    predicted(detector, lot, tmp_path / "one")
    barrier, turn, failures = threading.Barrier(2), threading.Lock(), []

    def run(index: int) -> None:
        try:
            predict_files(detector, [lot], "object", tmp_path / "two", mutual=True, mutual_settings=SETTINGS,
                          state=ThreadProcess(index, 2, barrier, turn))
        except BaseException as error:  # noqa: BLE001 - reported by the test thread below
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    one, two = scored(tmp_path / "one"), scored(tmp_path / "two")
    assert {image: (pytest.approx(score, abs=1e-6), verdict, group) for image, (score, verdict, group) in one.items()} == two
    groups_by_process = [{json.loads(line)["group"] for line in (tmp_path / "two" / f"records-{i}.jsonl").read_text().splitlines()}
                         for i in (0, 1)]
    assert groups_by_process[0] and groups_by_process[1] and not groups_by_process[0] & groups_by_process[1]
    assert len(set(groups_by_process[0] | groups_by_process[1])) == 3


def predict_args(folder, out, *extra: str) -> list[str]:
    return ["predict", str(folder), "--model", "baseline", "--image-size", str(IMAGE_SIZE), "--out", str(out),
            "--device", "cpu", "--precision", "float32", "--mutual", *extra]


def test_a_killed_run_resumes_at_its_next_group_with_the_same_scores(detector, lot, tmp_path, recwarn):
    whole = tmp_path / "whole"
    one_run = predicted(detector, lot, whole)
    lines = (whole / "records-0.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["group"]
    finished = [line for line in lines if json.loads(line)["group"] == first]
    # What a kill during the second group's records leaves: the first group's records and files, half a line.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copyfile(whole / "run.json", killed / "run.json")  # written before any record, so a kill leaves it
    (killed / "records-0.jsonl").write_text("\n".join(finished) + "\n" + lines[len(finished)][:40])
    for line in finished:
        for name in ("overlay", "mask"):
            shutil.copyfile(whole / json.loads(line)[name], killed / json.loads(line)[name])
    assert predicted(detector, lot, killed, resume=True) == one_run
    records = [json.loads(line) for line in (killed / "records-0.jsonl").read_text().splitlines()[len(finished) + 1:]]
    assert len(records) == LOT - len(finished) and first not in {record["group"] for record in records}  # not scored again
    assert any("line 5 ignored" in str(warning.message) for warning in recwarn)


def test_a_resumed_lot_whose_groups_changed_is_scored_again(detector, lot, tmp_path):
    grown = tmp_path / "grown"
    shutil.copytree(lot, grown)
    first = predicted(detector, grown, tmp_path / "out")
    part(99).save(grown / "new.png")  # one more image: the groups of the lot are dealt anew
    resumed = predicted(detector, grown, tmp_path / "out", resume=True)
    assert resumed == predicted(detector, grown, tmp_path / "fresh")
    assert not {group for _, _, group in first.values()} & {group for _, _, group in resumed.values()}


def test_groups_are_yielded_one_at_a_time_from_an_iterable_and_gathered_in_input_order(detector, lot):
    paths = sorted(lot.iterdir())
    groups = detect_mutual_groups(detector, (path for path in paths), "plate", settings=SETTINGS)
    first = next(groups)
    assert len(first.indices) == len(first.outcomes) == 4
    rest = list(groups)
    assert sorted(i for group in [first, *rest] for i in group.indices) == list(range(LOT))
    keys = lot_keys(paths)
    assert first.id == group_id([keys[i] for i in first.indices])
    in_order = detect_mutual(detector, paths, "plate", settings=SETTINGS)
    by_index = {i: outcome for group in [first, *rest] for i, outcome in zip(group.indices, group.outcomes)}
    assert [result.score for result in in_order] == [by_index[i].score for i in range(LOT)]
    assert all(result.details.compared_with == len(group.indices) - 1 for group in [first, *rest] for result in group.outcomes)


def test_an_unreadable_file_is_an_outcome_when_skipped_and_an_error_otherwise(detector, lot, tmp_path):
    paths = sorted(lot.iterdir())[:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ZSADError, match="broken.png"):
        detect_mutual(detector, [*paths, broken], "plate")
    (group,) = list(detect_mutual_groups(detector, [*paths, broken], "plate", skip_unreadable=True))
    outcomes = dict(zip(group.indices, group.outcomes))
    assert isinstance(outcomes[5], ZSADError) and all(outcomes[i].details.compared_with == 4 for i in range(5))


def reference_group(detector, images: list[Image.Image], settings: MutualSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One group by the arithmetic alone: mutual patch distances, bilinear upsampling, scipy's Gaussian (sigma 4 at 518
    px, mirrored borders), robust z-scores over the group, each map's maximum (RsCIN when asked), the logistic."""
    model = detector.model("baseline")
    with torch.inference_mode():
        features = model.encode_image(model.image_processor.pixel_values(images))
    tokens = list(torch.stack([features.patch_tokens(i) for i in range(len(features.layers))], dim=1))
    patch_maps = mutual_scores(tokens, settings, keys=[content_key(image) for image in images]).patch_maps
    grid = features.grid_size
    upsampled = F.interpolate(patch_maps.view(-1, 1, grid, grid), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0]
    smoothed = torch.from_numpy(np.stack([gaussian_filter(m.double().numpy(), 4.0 * IMAGE_SIZE / 518, mode="mirror")
                                          for m in upsampled])).float()
    z = standardise(smoothed, settings.min_spread)
    raw = z.flatten(1).amax(dim=1)
    if settings.rescore:
        raw = rescore(raw, features.image_embeds, settings.rescore_k)
    return to_unit(z, settings), to_unit(standardise(raw), settings)


@pytest.mark.parametrize("rescored", [False, True])
def test_a_one_group_lot_is_scored_as_the_mutual_arithmetic_says(detector, rescored):
    images = [part(i, defect=i == 4) for i in range(6)]
    settings = MutualSettings(rescore=rescored)
    results = detect_mutual(detector, images, "plate", settings=settings)
    maps, scores = reference_group(detector, images, settings)
    torch.testing.assert_close(torch.from_numpy(np.stack([r.model_map for r in results])), maps, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([r.score for r in results]), scores, atol=2e-5, rtol=0)
    if rescored:  # re-scoring changes the scores
        plain = detect_mutual(detector, images, "plate")
        assert not np.allclose([r.score for r in results], [r.score for r in plain], atol=1e-3)


def test_the_image_score_is_the_map_maximum_or_the_mean_of_its_top_pixels():
    maps = torch.tensor([[[0.1, 0.9], [0.3, 0.5]], [[0.2, 0.2], [0.4, 0.0]]])
    torch.testing.assert_close(map_image_scores(maps, MutualSettings()), torch.tensor([0.9, 0.4]))
    top_half = MutualSettings(image_score="top_k_mean", top_fraction=0.5)
    torch.testing.assert_close(map_image_scores(maps, top_half), torch.tensor([0.7, 0.3]))


def test_rescoring_window_sizes_below_one_are_refused():
    with pytest.raises(ZSADError, match="rescore=False"):
        MutualSettings(rescore_k=(0,))
    with pytest.raises(ZSADError, match="at least 1"):
        MutualSettings(rescore_k=())


def test_cli_rescore_turns_rsc_in_on(detector, tiny_clip_path, tmp_path, capsys):
    folder = tmp_path / "lot"
    folder.mkdir()
    for i in range(6):
        part(i, defect=i == 4).save(folder / f"{i}.png")
    assert main(predict_args(folder, tmp_path / "out", "--clip", str(tiny_clip_path), "--rescore")) == 0
    expected = detect_mutual(detector, sorted(folder.iterdir()), "object", settings=MutualSettings(rescore=True))
    records = json.loads((tmp_path / "out" / "scores.json").read_text())["images"]
    assert [record["score"] for record in records] == pytest.approx([r.score for r in expected], abs=1e-5)
    assert main(["predict", str(folder), "--model", "baseline", "--out", str(tmp_path / "x"), "--rescore"]) == 2
    assert "--rescore re-scores mutual scores; add --mutual" in capsys.readouterr().err


def camera_part(seed: int) -> Image.Image:
    """A part photographed larger than the model's input and not square, so that reading, resizing and overlays at the
    image's own size all matter."""
    return part(seed, defect=seed == 2).resize((150, 110), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("display_side", [None, 120])
def test_each_detection_is_made_at_full_size_as_scoring_the_whole_pictures_makes_it(detector, tmp_path, display_side):
    """A group keeps its pictures at the model's input size only and makes each image's full-size outputs when asked
    for; scores, maps, masks, overlays and predict's records and files equal those of the group scored from the whole
    pictures as read."""
    folder = tmp_path / "lot"
    folder.mkdir()
    for i in range(5):
        camera_part(i).save(folder / f"{i}.jpg", quality=90)
    paths = sorted(folder.iterdir())
    settings = MutualSettings(degrees=(1, 3))  # one group of five
    (order,) = lot_groups(lot_keys(paths), settings, [str(path) for path in paths])
    pictures = [read_image(path, max_side=display_side).image for path in paths]
    whole = score_group(detector.model("baseline"), [pictures[i] for i in order], [content_key(pictures[i]) for i in order],
                        detector.product_name("plate", "baseline"), 0.0, settings)
    results = detect_mutual(detector, paths, "plate", settings=settings, display_side=display_side)
    for position, i in enumerate(order):
        result, picture, model_map = results[i], pictures[i], whole.maps[position].numpy()
        assert result.score == float(whole.scores[position]) and np.array_equal(result.model_map, model_map)
        expected_map = resize_map(model_map, picture.size)
        assert result.anomaly_map.shape == (picture.height, picture.width) and np.array_equal(result.anomaly_map, expected_map)
        assert np.array_equal(result.mask, expected_map >= 0.5)
        assert np.array_equal(np.asarray(result.overlay), np.asarray(overlay_heatmap(picture, expected_map)))
    if display_side is None:
        predict_files(detector, [folder], "plate", tmp_path / "out", mutual=True, mutual_settings=settings, state=one_process())
        records = json.loads((tmp_path / "out" / "scores.json").read_text())["images"]
        for record, result, picture in zip(records, results, pictures):
            assert record["score"] == result.score and record["anomalous_pixel_fraction"] == float(result.mask.mean())
            overlay = Image.open(tmp_path / "out" / record["overlay"])
            assert overlay.size == picture.size and np.array_equal(np.asarray(overlay), np.asarray(result.overlay))
