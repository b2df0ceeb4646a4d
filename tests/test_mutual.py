"""Mutual scoring (zsad.detection.mutual): the scores against a brute-force MuSc-style reference (cdist, unfold), a defect patch
found on a hand-built batch, independence of image order, chunking and a cap of N - 1, exact duplicates, the
batch-scale outputs, detect_mutual on the tiny CLIP (and as the detector's method), `zsad evaluate --mutual` and
`zsad predict --mutual`; tests/test_mutual_groups.py: lots scored group by group."""

import contextlib
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zsad
from zsad import AnomalyDetector, ZSADError
from zsad.data.synthetic import generate
from zsad.detection.mutual import (
    MutualSettings,
    aggregate,
    comparison_groups,
    detect_mutual,
    far_notes,
    fused,
    mutual_scores,
    rescore,
    standardise,
)
from zsad_cli import main

GRID, WIDTH, LAYERS = 4, 8, 2
IMAGE_SIZE = 56


def product_batch(count: int, seed: int = 0, noise: float = 0.05) -> list[torch.Tensor]:
    """``count`` images of one 'product': the same (L, P, D) patch pattern plus a little noise per image."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randn(LAYERS, GRID * GRID, WIDTH, generator=generator)
    return [pattern + noise * torch.randn(pattern.shape, generator=generator) for _ in range(count)]


def with_defect(features: torch.Tensor, patch: int) -> torch.Tensor:
    """A copy of one image's features where ``patch`` is unlike any patch of the product (every layer)."""
    defective = features.clone()
    defective[:, patch] = 10.0 * torch.ones(WIDTH)
    return defective


def reference_lnamd(tokens: torch.Tensor, degree: int) -> torch.Tensor:
    """MuSc's LNAMD as its code does it: layer norm module, unfold, adaptive average pooling over (D * r * r)."""
    count, patches, width = tokens.shape
    grid = math.isqrt(patches)
    x = tokens.permute(0, 2, 1).reshape(count, width, grid, grid)
    x = torch.nn.LayerNorm([width, grid, grid], elementwise_affine=False)(x)
    if degree > 1:
        unfolded = F.unfold(x, kernel_size=degree, padding=(degree - 1) // 2).reshape(count, width * degree * degree, -1)
        x = F.adaptive_avg_pool1d(unfolded.permute(0, 2, 1).reshape(-1, 1, width * degree * degree), width)
        x = x.reshape(count, patches, width)
    else:
        x = x.flatten(2).transpose(1, 2)
    return x / x.norm(dim=-1, keepdim=True)


def reference_scores(features: list[torch.Tensor], degrees, interval) -> torch.Tensor:
    """MuSc's compute_scores_slow per layer and degree: cdist to each other image, min, interval average, means."""
    count = len(features)
    total = torch.zeros(count, GRID * GRID, dtype=torch.float64)
    for layer in range(LAYERS):
        for degree in degrees:
            z = reference_lnamd(torch.stack([f[layer] for f in features]).double(), degree)
            for i in range(count):
                nearest = torch.stack([torch.cdist(z[i], z[j]).min(dim=1).values for j in range(count) if j != i], dim=1)
                k_min, k_max = int((count - 1) * interval[0]), max(1, int((count - 1) * interval[1]))
                total[i] += nearest.sort(dim=1).values[:, k_min:k_max].mean(dim=1)
    return (total / (LAYERS * len(degrees))).float()


def test_aggregation_is_musc_lnamd():
    tokens = torch.randn(3, GRID * GRID, WIDTH, generator=torch.Generator().manual_seed(1))
    for degree in (1, 3, 5):
        torch.testing.assert_close(aggregate(tokens, degree), reference_lnamd(tokens, degree), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interval", [(0.0, 0.3), (0.0, 1.0), (0.25, 0.75)])
def test_scores_equal_a_brute_force_musc_reference(interval):
    features = product_batch(7, noise=0.5)
    scores = mutual_scores(features, MutualSettings(interval=interval))
    torch.testing.assert_close(scores.patch_maps, reference_scores(features, (1, 3, 5), interval), atol=1e-4, rtol=1e-4)
    assert scores.compared.tolist() == [6] * 7


def test_a_patch_unlike_every_other_image_scores_highest():
    features = product_batch(6)
    features[2] = with_defect(features[2], patch=5)
    maps = mutual_scores(features, MutualSettings(degrees=(1,))).patch_maps
    assert maps.flatten().argmax().item() == 2 * GRID * GRID + 5
    assert maps[2, 5] > 5 * maps[[0, 1, 3, 4, 5]].max()


def test_scores_do_not_depend_on_the_order_of_the_images():
    features = product_batch(9, noise=0.3)
    features[4] = with_defect(features[4], patch=0)
    order = [7, 2, 8, 0, 4, 1, 6, 3, 5]
    for cap in (8, 3):  # one group, and groups chosen by content
        settings = MutualSettings(max_compared=cap)
        straight = mutual_scores(features, settings)
        shuffled = mutual_scores([features[i] for i in order], settings)
        torch.testing.assert_close(shuffled.patch_maps, straight.patch_maps[order], atol=1e-6, rtol=1e-6)
        assert shuffled.compared.tolist() == straight.compared[order].tolist()


def test_chunked_products_equal_one_product():
    features = product_batch(5, noise=0.3)
    whole = mutual_scores(features, MutualSettings(block=1 << 24)).patch_maps
    for block in (7, GRID * GRID, 3 * GRID * GRID * GRID * GRID):  # rows of one image, whole images, several images
        torch.testing.assert_close(mutual_scores(features, MutualSettings(block=block)).patch_maps, whole, atol=1e-6, rtol=1e-6)


def test_a_cap_of_at_least_n_minus_1_is_the_uncapped_result_and_a_smaller_cap_bounds_the_comparisons():
    features = product_batch(10, noise=0.3)
    uncapped = mutual_scores(features, MutualSettings(max_compared=1000))
    torch.testing.assert_close(mutual_scores(features, MutualSettings(max_compared=9)).patch_maps, uncapped.patch_maps)
    capped = mutual_scores(features, MutualSettings(max_compared=4))
    assert capped.compared.max() <= 4 and capped.compared.min() >= 1
    assert not torch.allclose(capped.patch_maps, uncapped.patch_maps)


def test_groups_cover_every_image_once_within_the_cap():
    keys = [f"{i:03d}" for i in range(200)]
    groups = comparison_groups(keys, 31)
    assert sorted(i for group in groups for i in group) == list(range(200))
    assert len(groups) == 7 and all(len(group) - 1 <= 31 and len(group) >= 2 for group in groups)
    assert comparison_groups(["a", "b", "c"], 1) == [[0, 1, 2]]  # never a group of one
    assert [sorted(g) for g in comparison_groups(["x", "x", "y", "y"], 1)] == [[0, 2], [1, 3]]  # duplicates apart


def test_exact_duplicates_do_not_hide_each_others_defects():
    features = product_batch(6)
    features[0] = with_defect(features[0], patch=3)
    features.append(features[0].clone())  # an exact duplicate of the defective image
    keys = [f"image-{i}" for i in range(6)] + ["image-0"]
    scores = mutual_scores(features, MutualSettings(degrees=(1,)), keys=keys)
    assert scores.compared.tolist() == [5, 6, 6, 6, 6, 6, 5]
    for image in (0, 6):
        assert scores.patch_maps[image].argmax().item() == 3
        assert scores.patch_maps[image, 3] > 5 * scores.patch_maps[1:6].max()
    hidden = mutual_scores(features, MutualSettings(degrees=(1,)), keys=[f"image-{i}" for i in range(7)])
    assert hidden.patch_maps[0, 3] < 0.5 * scores.patch_maps[0, 3]  # what exclusion prevents


def test_one_image_or_only_duplicates_are_refused():
    features = product_batch(2)
    with pytest.raises(ZSADError, match="at least two images"):
        mutual_scores(features[:1])
    with pytest.raises(ZSADError, match="identical"):
        mutual_scores([features[0], features[0].clone()])


def test_rescoring_averages_normalised_scores_over_the_nearest_images():
    scores = torch.tensor([1.0, 3.0, 5.0])
    embeddings = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    torch.testing.assert_close(rescore(scores, embeddings, (1,)), torch.tensor([0.0, 0.5, 1.0]))
    # k = 2: image 0's nearest are itself (1) and image 1 (0.8): (1 * 0 + 0.8 * 0.5) / 1.8; image 2 and 1 (0.6).
    expected = torch.tensor([0.4 / 1.8, (0.8 * 0 + 1.0 * 0.5) / 1.8, (0.6 * 0.5 + 1.0 * 1.0) / 1.6])
    torch.testing.assert_close(rescore(scores, embeddings, (2,)), expected)


def test_standardised_values_are_robust_z_scores_over_the_batch():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 2.5], [3.5, 2.0, 4.0]])
    z = standardise(values)  # median 3, absolute deviations 2 1 0 1 97 0.5 0.5 1 1: MAD 1 (the outlier does not count)
    torch.testing.assert_close(z, (values - 3.0) / 1.4826)


def test_fusion_is_the_weighted_mean_of_standardised_sources_without_those_of_weight_0():
    mutual = torch.tensor([[0.2, 0.3, 0.4, 0.9]])
    text = torch.tensor([[0.5, 0.1, 0.7, 0.6]])
    expected = (standardise(mutual) + 0.5 * standardise(text)) / 1.5
    torch.testing.assert_close(fused([(mutual, 1.0), (text, 0.5)], 0.0), expected)
    torch.testing.assert_close(fused([(mutual, 1.0), (text, 0.0)], 0.0), standardise(mutual))


def test_far_images_get_notes():
    assert far_notes(torch.tensor([0.2, 0.3, 0.25]), 1.0) == [None, None, None]
    one_off = far_notes(torch.tensor([0.2, 1.3, 0.25]), 1.0)
    assert one_off[0] is None and one_off[2] is None and "unlike the others" in one_off[1]
    assert all("do not look like one product" in note for note in far_notes(torch.tensor([1.2, 1.3, 1.1]), 1.0))


@pytest.fixture(scope="module")
def detector(tiny_clip_path):
    return AnomalyDetector.load(methods=["baseline"], clip=str(tiny_clip_path), image_size=IMAGE_SIZE, device="cpu")


def part_images(count: int) -> list[Image.Image]:
    """Striped parts of mixed sizes; the last has a dark square (a defect)."""
    images = []
    for i in range(count):
        width, height = 64 + 8 * i, 64
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:, :] = 180
        pixels[::8] = 90
        images.append(pixels)
    images[-1][20:36, 20:36] = 0
    return [Image.fromarray(pixels) for pixels in images]


def test_detect_mutual_returns_one_detection_per_image_at_its_size(detector):
    images = part_images(5)
    results = detect_mutual(detector, images, "striped plate", settings=MutualSettings(degrees=(1, 3)))
    assert [r.anomaly_map.shape for r in results] == [(64, 64 + 8 * i) for i in range(5)]
    assert all(r.details.compared_with == 4 and r.details.text_weight == 0.0 for r in results)  # training-free: mutual only
    assert all(0.0 <= r.anomaly_map.min() and r.anomaly_map.max() <= 1.0 for r in results)
    assert max(results, key=lambda r: r.score) is results[-1]
    assert results[-1].anomaly_map[20:36, 20:36].mean() > results[-1].anomaly_map[:, 48:].mean()
    assert results[0].summary()["details"]["compared_with"] == 4


def test_detect_mutual_scores_are_those_of_mutual_scores_on_the_encoded_images(detector):
    images = part_images(4)
    results = detect_mutual(detector, images, "striped plate", settings=MutualSettings(max_compared=2))
    assert [r.details.compared_with for r in results] == [1, 1, 1, 1]  # two groups of two
    model = detector.model("baseline")
    pixel_values = zsad.runtime.images.to_pixel_values(images, IMAGE_SIZE, detector.backbone.image_mean, detector.backbone.image_std)
    with torch.inference_mode():
        features = model.encode_image(pixel_values)
    tokens = list(torch.stack([features.patch_tokens(i) for i in range(len(features.layers))], dim=1))
    from zsad.detection.mutual import content_key
    direct = mutual_scores(tokens, MutualSettings(max_compared=2), keys=[content_key(image) for image in images])
    torch.testing.assert_close(torch.tensor([r.details.median_distance for r in results]),
                               direct.patch_maps.median(dim=1).values, atol=1e-4, rtol=0)


def test_text_and_reference_maps_are_fused_when_asked(detector):
    images = part_images(4)
    alone = detect_mutual(detector, images, "striped plate")
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-25, 26, np.asarray(image).shape), 0, 255)
                             .astype(np.uint8)) for image in part_images(3)[:2]]  # identical stripes would give flat maps
    profile = detector.build_profile("baseline", "striped plate", noisy)
    settings = MutualSettings(text_weight=0.5)
    both = detect_mutual(detector, images, "striped plate", profile=profile, settings=settings)
    assert [(r.details.text_weight, r.details.reference_weight, r.references) for r in both] == [(0.5, 1.0, 2)] * 4
    assert not np.allclose(both[-1].anomaly_map, alone[-1].anomaly_map)


def test_the_cli_names_the_unnamed_product_as_zsad_does():
    import zsad_cli.choices
    from zsad.modeling.mutual_scoring import UNNAMED_PRODUCT

    assert zsad_cli.choices.MUTUAL_CLASS_NAME == UNNAMED_PRODUCT  # zsad_cli answers --help without importing torch


def test_the_detector_method_is_the_function(detector):
    images = part_images(4)
    settings = MutualSettings(degrees=(1, 3))
    method = detector.detect_mutual(images, "striped plate", settings=settings, threshold=0.4)
    function = detect_mutual(detector, images, "striped plate", method="baseline", settings=settings, threshold=0.4)
    assert [(r.score, r.threshold, r.details) for r in method] == [(r.score, r.threshold, r.details) for r in function]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(method, function))
    with pytest.raises(ZSADError, match="Unknown method 'stackclip'"):
        detector.detect_mutual(images, "striped plate", method="stackclip")


def test_every_encoding_batch_and_group_scoring_takes_a_turn(detector):
    turns = []

    @contextlib.contextmanager
    def turn():
        turns.append("taken")
        yield

    detect_mutual(detector, part_images(5), "plate", batch_size=2, settings=MutualSettings(max_compared=2), turn=turn)
    assert len(turns) == (2 + 1) + (1 + 1)  # groups of 3 and 2 images: encoded in batches of 2, then scored


def test_detect_mutual_refuses_one_image_and_identical_copies(detector):
    image = part_images(1)[0]
    with pytest.raises(ZSADError, match="at least two images"):
        detect_mutual(detector, [image], "plate")
    with pytest.raises(ZSADError, match="identical"):
        detect_mutual(detector, [image, image.copy()], "plate")


def test_cli_evaluate_mutual_marks_its_outputs(tiny_clip_path, tmp_path, capsys):
    root = generate(tmp_path / "data", categories=["tile"], num_good=3, num_defective=3, image_size=64, num_train_good=0)
    code = main(["evaluate", "--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(IMAGE_SIZE),
                 "--dataset", "mvtec", "--root", str(root), "--out", str(tmp_path / "out"), "--mutual"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["mutual"] is True and report["num_images"] == 6
    assert 0.0 <= report["mean"]["pixel_auroc"] <= 1.0
    assert "mutual" in (tmp_path / "out" / "evaluation.md").read_text().splitlines()[0]
    assert (tmp_path / "out" / "evaluation.png").stat().st_size > 0


def predict_args(folder, out, *extra: str) -> list[str]:
    return ["predict", str(folder), "--model", "baseline", "--image-size", str(IMAGE_SIZE), "--out", str(out),
            "--device", "cpu", "--precision", "float32", *extra]


@pytest.fixture
def parts_folder(tmp_path):
    folder = tmp_path / "lot"
    folder.mkdir()
    for i, image in enumerate(part_images(5)):
        image.save(folder / f"{i:03d}.png")
    return folder


def test_cli_predict_mutual_scores_the_folder_as_one_batch(detector, tiny_clip_path, parts_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(predict_args(parts_folder, out, "--clip", str(tiny_clip_path), "--mutual")) == 0  # no --class-name: untrained
    summary = json.loads((out / "scores.json").read_text())
    assert summary["mutual"] is True and summary["class_name"] == "object"
    assert summary["calibration"].startswith("mutual: scored against its group")
    expected = detector.detect_mutual(sorted(parts_folder.iterdir()), "object")
    assert [record["score"] for record in summary["images"]] == pytest.approx([r.score for r in expected], abs=1e-5)
    assert [record["details"]["compared_with"] for record in summary["images"]] == [4] * 5
    assert Image.open(out / "004_mask.png").size == (96, 64) and (out / "004_overlay.png").is_file()
    assert "each image was compared with 4 other images" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--tiles"], "--mutual and --tiles cannot be combined"),
    (["--engine", "onnx"], "--mutual runs a model, not an exported graph"),
    (["--reference", "REFS"], "a profile .* belongs to a named product"),
])
def test_cli_predict_mutual_refuses_what_it_cannot_do(tiny_clip_path, parts_folder, tmp_path, capsys, extra, message):
    extra = [str(parts_folder) if item == "REFS" else item for item in extra]
    assert main(predict_args(parts_folder, tmp_path / "out", "--clip", str(tiny_clip_path), "--mutual", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_predict_mutual_needs_two_images(tiny_clip_path, parts_folder, tmp_path, capsys):
    code = main(predict_args(parts_folder / "000.png", tmp_path / "out", "--clip", str(tiny_clip_path), "--mutual", "--class-name", "plate"))
    assert code == 2 and "at least two images" in capsys.readouterr().err


def test_the_summary_lines_give_the_comparison_counts_and_the_notes():
    from zsad.cli.summaries import mutual_lines

    one_product = far_notes(torch.tensor([1.2, 1.3, 1.1]), 1.0)
    lines = mutual_lines([2, 2, 2], one_product)
    assert lines == ["Scored against each other: each image was compared with 2 other images (no text, no references needed).",
                     f"Note: {one_product[0]}"]
    lines = mutual_lines([15, 15, 14], [None, "This image looks unlike the others", None])
    assert "compared with 14 to 15 other images" in lines[0]
    assert lines[1] == "Note: 1 image looks unlike the others; see their notes."
    assert mutual_lines([1, 1], [None, None])[1:] == []
