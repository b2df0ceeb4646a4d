"""Reference images and calibration (issue 10) on the tiny random CLIP and the synthetic generator, whose train/good
images are the references: maps, leave-one-out, thresholds, product profiles on disk, the CLI and few-shot evaluation."""

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from zsad import AnomalyDetector, ProductProfile, ZeroShotCLIPModel, ZSADError
from zsad.cli.commands import evaluate
from zsad.data import load_dataset, read_mask
from zsad.data.synthetic import generate
from zsad.detection.profile import calibrate, choose_weight
from zsad.detection.references import FusionScale, ReferenceMemory, SourceMaps, nearest_similarity
from zsad.evaluation.few_shot import evaluate_few_shot
from zsad.metrics import image_metrics, pixel_metrics
from zsad.modeling.clip_backbone import ImageFeatures
from zsad.runtime.images import load_image, to_pixel_values
from zsad.testing import save_tiny_clip
from zsad_cli import add_evaluation_arguments
from zsad_cli import main as zsad_main

from conftest import TEST_IMAGE_SIZE

CATEGORIES = ["disk", "wood"]  # held out: nothing was trained on them (nothing is trained at all)
SHOTS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), categories=CATEGORIES, num_good=12, num_defective=6, image_size=64,
                    seed=0, num_train_good=8)


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    # The methods that score images with the map too: AnomalyCLIP scores them by the global embedding alone (its
    # authors' rule), so references change its map, not its image score.
    return AnomalyDetector.load(methods=["baseline", "genclip", "stackclip"], clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


def train_good(root, category: str, count: int = SHOTS) -> list[str]:
    return [str(path) for path in sorted((root / category / "train" / "good").glob("*.png"))[:count]]


def test_nearest_similarity_is_the_brute_force_maximum_in_any_chunking():
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=generator), dim=-1)
    memory = torch.nn.functional.normalize(torch.randn(13, 8, generator=generator), dim=-1)
    expected = torch.einsum("bnd,md->bnm", queries, memory).amax(dim=-1)
    for block in (1, 10, 64, 1 << 20):  # one memory row at a time ... everything at once
        torch.testing.assert_close(nearest_similarity(queries, memory, block=block), expected)


def test_an_image_in_the_memory_has_distance_zero_and_others_do_not(detector):
    pixels = torch.randn(3, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        features = detector.model("baseline").encode_image(pixels)
    memory = ReferenceMemory.from_features(features)
    distances = memory.patch_distances(features)
    assert distances.shape == (3, 4, 64) and distances.abs().max() < 1e-5
    others = memory.leave_out(0).patch_distances(ImageFeatures(features.layers, [t[:1] for t in features.layer_tokens],
                                                                features.image_embeds[:1], features.grid_size, features.image_size,
                                                                features.vv_attention_from))
    assert others.min() > 1e-3


def test_reference_maps_find_defects_the_untrained_zero_shot_model_does_not(detector, dataset):
    """K = 4 references. An untrained model's default profile is references only; a profile given half the defective
    images with masks chooses its weight on them, and its fused map (scored on the other half and the good test
    images) stays within 0.03 pixel AUROC of references only, above zero-shot; every method."""
    results, weights = {}, {}
    for category in CATEGORIES:
        samples = load_dataset("mvtec", dataset, categories=[category])
        defective = [s for s in samples if s.label]
        shown, held_out = defective[::2], [s for s in samples if s not in defective[::2]]
        images, masks = [s.image_path for s in held_out], [read_mask(s) for s in held_out]
        profiles = detector.build_profiles(detector.method_names, category, train_good(dataset, category))
        chosen = detector.build_profiles(detector.method_names, category, train_good(dataset, category),
                                         [str(s.image_path) for s in shown], [str(s.mask_path) for s in shown])
        for method, only_references in profiles.items():
            assert only_references.fusion.weight == 1.0 and only_references.fusion.is_standardised
            weights[method, category] = chosen[method].fusion.weight
            half = dataclasses.replace(only_references, fusion=only_references.fusion.with_weight(0.5))
            for name, profile in (("zero-shot", None), ("references", only_references), ("chosen", chosen[method]), ("half", half)):
                maps = [d.anomaly_map for d in detector.detect_batch(images, category, method=method, profile=profile)]
                results[method, name, category] = pixel_metrics(masks, maps)["pixel_auroc"]
    print("\npixel AUROC: " + ", ".join(f"{method} {name} {category} {value:.3f}" for (method, name, category), value in results.items()))
    print(f"chosen weights: {weights}")
    for method in detector.method_names:
        for category in CATEGORIES:
            references = results[method, "references", category]
            assert references > 0.9 and references > results[method, "zero-shot", category] + 0.25
            assert abs(results[method, "chosen", category] - references) < 0.03
            assert results[method, "chosen", category] > results[method, "zero-shot", category]


def test_leave_one_out_scores_each_reference_against_the_others_only(detector, dataset):
    references = train_good(dataset, "disk")
    profile = detector.build_profile("baseline", "disk", references)
    assert profile.calibration.num_good == len(references)
    for index, path in enumerate(references):
        without = dataclasses.replace(profile, memory=profile.memory.leave_out(index))
        left_out = detector.detect(path, "disk", method="baseline", profile=without)
        assert left_out.score == pytest.approx(profile.calibration.good_scores[index], abs=1e-5)
    # Against the full memory a reference finds itself: its reference map is 0, which the untrained model's profile
    # (references only) standardises to -location / spread everywhere; the image score adds the global probability.
    model = detector.model("baseline")
    pixels = to_pixel_values([load_image(references[0])], TEST_IMAGE_SIZE, detector.backbone.image_mean, detector.backbone.image_std)
    with torch.inference_mode():
        global_score = model(pixels, class_names=["disk"]).global_score.item()
    fusion = profile.fusion
    own = 1.0 / (1.0 + math.exp(-4.0 * (-fusion.reference_location / fusion.reference_spread - 1.0)))
    found = detector.detect(references[0], "disk", method="baseline", profile=profile)
    assert found.score == pytest.approx(0.5 * global_score + 0.5 * own, abs=1e-5)
    assert found.model_map.max() == pytest.approx(own, abs=1e-5)


def test_good_only_calibration_keeps_the_false_alarm_rate_near_the_quantile(detector, dataset):
    quantile = 0.75
    rates = []
    for category in CATEGORIES:
        profile = detector.build_profile("baseline", category, train_good(dataset, category, 8), quantile=quantile, margin=0.0)
        held_out = [s for s in load_dataset("mvtec", dataset, categories=[category]) if not s.label]
        verdicts = [d.is_anomalous for d in detector.detect_batch([s.image_path for s in held_out], category, "baseline", profile=profile)]
        rates.append(np.mean(verdicts))
        assert profile.calibration.rule == "good quantile"
        assert profile.calibration.false_alarm_rate() <= 1 - quantile + 1e-9
    print(f"\nfalse-alarm rates on held-out good images at quantile {quantile}: {rates}")
    assert np.mean(rates) <= (1 - quantile) + 0.1
    default = detector.build_profile("baseline", "disk", train_good(dataset, "disk", 8))  # max + margin: no LOO false alarm
    assert default.calibration.false_alarm_rate() == 0.0
    assert default.calibration.image_threshold == pytest.approx(max(default.calibration.good_scores) + 0.01)


def test_labelled_calibration_reaches_f1_max_on_the_calibration_images(detector, dataset):
    category = "wood"
    defective = [s for s in load_dataset("mvtec", dataset, categories=[category]) if s.label]
    masks = [str(s.mask_path) for s in defective]
    profile = detector.build_profile("baseline", category, train_good(dataset, category), [str(s.image_path) for s in defective], masks)
    calibration = profile.calibration
    flagged = sum(score >= calibration.image_threshold for score in calibration.good_scores)
    assert calibration.rule == "F1-max" and calibration.describe() == (
        f"calibrated on {SHOTS} good (+ {len(defective)} defective) images: F1-max, {flagged} of {SHOTS} good images flagged "
        "leave-one-out (no guaranteed rate)")
    labels = [0] * calibration.num_good + [1] * calibration.num_defective
    scores = np.array(calibration.good_scores + calibration.defective_scores)
    predicted = scores >= calibration.image_threshold
    true_positives = np.sum(predicted & np.array(labels, dtype=bool))
    f1 = 2 * true_positives / (predicted.sum() + sum(labels))
    assert f1 == pytest.approx(image_metrics(labels, scores)["image_f1_max"], abs=1e-12)
    # The same scores come out of detect, whose verdict uses the calibrated threshold.
    detections = detector.detect_batch([s.image_path for s in defective], category, method="baseline", profile=profile)
    np.testing.assert_allclose([d.score for d in detections], calibration.defective_scores, atol=1e-5)
    assert all(d.threshold == calibration.image_threshold and d.mask_threshold == calibration.pixel_threshold for d in detections)
    assert detections[0].summary()["calibration"] == calibration.describe()


def test_the_pixel_threshold_with_masks_is_the_pixel_f1_max_threshold():
    rng = np.random.default_rng(0)
    masks = [rng.random((6, 6)) > 0.7 for _ in range(3)]
    maps = [(m * 0.4 + rng.random((6, 6)) * 0.6).astype(np.float32) for m in masks]
    good_maps = [rng.random((6, 6)).astype(np.float32) * 0.5 for _ in range(2)]
    calibration = calibrate([0.1, 0.2], good_maps, [0.3, 0.9, 0.8], maps, masks)
    flat_masks = np.concatenate([np.zeros(72, bool)] + [m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in good_maps + maps])
    predicted = flat_maps >= calibration.pixel_threshold
    f1 = 2 * np.sum(predicted & flat_masks) / (predicted.sum() + flat_masks.sum())
    assert f1 == pytest.approx(pixel_metrics([np.zeros((6, 6), bool)] * 2 + masks, good_maps + maps)["pixel_f1_max"], abs=1e-9)
    assert calibration.pixel_threshold in set(flat_maps.tolist()) and calibration.image_threshold == pytest.approx(0.3)  # every defective, no good


def test_without_a_profile_nothing_changes_and_one_reference_is_used_uncalibrated(detector, dataset):
    image = load_dataset("mvtec", dataset, categories=["disk"])[-1].image_path
    plain = detector.detect(image, "disk", method="stackclip")
    assert plain.threshold == 0.5 and plain.pixel_threshold is None and plain.references == 0
    assert plain.summary()["calibration"] == "uncalibrated (threshold 0.5)"
    single = detector.build_profile("stackclip", "disk", train_good(dataset, "disk", 1))
    assert single.calibration is None and single.num_references == 1
    with_one = detector.detect(image, "disk", method="stackclip", profile=single)
    assert with_one.references == 1 and with_one.threshold == 0.5 and with_one.calibration == "uncalibrated (threshold 0.5)"
    assert with_one.score != plain.score


def test_compare_applies_each_methods_profile_in_one_vision_pass(detector, dataset):
    image = load_dataset("mvtec", dataset, categories=["wood"])[-1].image_path
    profiles = detector.build_profiles(detector.method_names, "wood", train_good(dataset, "wood"))
    assert len({id(profile.memory) for profile in profiles.values()}) == 1  # same layers: one memory for all methods
    compared = detector.compare(image, "wood", profiles=profiles)
    for method, result in compared.items():
        alone = detector.detect(image, "wood", method=method, profile=profiles[method])
        assert result.references == SHOTS and result.calibration == alone.calibration
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, atol=1e-5)


def test_profile_round_trip_in_a_new_process_gives_identical_maps(detector, dataset, tiny_clip_path, tmp_path):
    profile = detector.build_profile("baseline", "disk", train_good(dataset, "disk"))
    profile.save(tmp_path / "profile")
    meta = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert meta["num_references"] == SHOTS and meta["feature_layers"] == [1, 2, 3, 4] and meta["image_size"] == TEST_IMAGE_SIZE
    assert meta["backbone"] == str(tiny_clip_path) and meta["dtype"] == "torch.float32" and meta["zsad_version"]
    image = load_dataset("mvtec", dataset, categories=["disk"])[-1].image_path
    here = detector.detect(image, "disk", method="baseline", profile=profile)
    script = (
        "import sys, numpy as np\nfrom zsad import AnomalyDetector, ProductProfile\n"
        "detector = AnomalyDetector.load(methods=['baseline'], clip=sys.argv[1], image_size=int(sys.argv[2]), precision='float32')\n"
        "result = detector.detect(sys.argv[4], 'disk', profile=ProductProfile.load(sys.argv[3]))\n"
        "np.save(sys.argv[5], result.anomaly_map)\nprint(repr(result.score), result.calibration)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_clip_path), str(TEST_IMAGE_SIZE), str(tmp_path / "profile"),
                          str(image), str(tmp_path / "map.npy")], capture_output=True, text=True, check=True).stdout
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), here.anomaly_map, atol=1e-6)
    assert float(out.split()[0]) == pytest.approx(here.score, abs=1e-6) and here.calibration in out


def test_a_profile_for_another_backbone_size_or_layer_set_is_refused(detector, dataset, tmp_path):
    profile = detector.build_profile("baseline", "disk", train_good(dataset, "disk", 2))
    image = train_good(dataset, "disk", 3)[-1]
    other_clip = str(save_tiny_clip(tmp_path / "other-clip", seed=1))
    other_size = AnomalyDetector(detector.backbone, {"baseline": ZeroShotCLIPModel.from_clip(
        profile.backbone, clip_model=detector.backbone, image_size=2 * TEST_IMAGE_SIZE)})
    other_layers = AnomalyDetector(detector.backbone, {"baseline": ZeroShotCLIPModel.from_clip(
        profile.backbone, clip_model=detector.backbone, image_size=TEST_IMAGE_SIZE, feature_layers=[2, 4])})
    other_backbone = AnomalyDetector.load(methods=["baseline"], clip=other_clip, image_size=TEST_IMAGE_SIZE)
    for other, message in ((other_size, "built at 112 px, the model runs at 224 px"), (other_layers, "holds layers [1, 2, 3, 4]"),
                           (other_backbone, "built on the backbone")):
        with pytest.raises(ZSADError, match=r"does not fit: .*" + message.replace("[", r"\[").replace("]", r"\]")):
            other.detect(image, "disk", profile=profile)
    with pytest.raises(ZSADError, match="built for the product 'disk', not 'wood'"):
        detector.detect(image, "wood", method="baseline", profile=profile)
    with pytest.raises(ZSADError, match="built for the method 'baseline', not 'stackclip'"):
        detector.detect(image, "disk", method="stackclip", profile=profile)


def test_truncated_corrupt_or_missing_profile_files_are_clear_errors(detector, dataset, tmp_path):
    folder = detector.build_profile("baseline", "disk", train_good(dataset, "disk", 2)).save(tmp_path / "profile")
    memory = (folder / "memory.safetensors").read_bytes()
    (folder / "memory.safetensors").write_bytes(memory[: len(memory) // 2])
    with pytest.raises(ZSADError, match="not the memory profile.json was written with .sha256 differs.*damaged"):
        ProductProfile.load(folder)
    (folder / "memory.safetensors").write_bytes(memory)
    meta = (folder / "profile.json").read_text()
    (folder / "profile.json").write_text(meta[:40])
    with pytest.raises(ZSADError, match="not valid JSON"):
        ProductProfile.load(folder)
    (folder / "profile.json").write_text(meta.replace('"num_references": 2', '"num_references": 3'))
    with pytest.raises(ZSADError, match="incomplete or inconsistent"):
        ProductProfile.load(folder)
    with pytest.raises(ZSADError, match="No profile.json"):
        ProductProfile.load(tmp_path / "nowhere")


def test_bad_reference_input_is_a_clear_error(detector, tmp_path, bad_files):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZSADError, match="No good images were given"):
        detector.build_profile("baseline", "disk", tmp_path / "empty")
    with pytest.raises(ZSADError, match="Not a readable image|could not be decoded|not found"):
        detector.build_profile("baseline", "disk", [next(iter(bad_files.values()))])
    with pytest.raises(ZSADError, match="quantile"):
        detector.build_profile("baseline", "disk", [np.zeros((32, 32, 3), np.uint8)] * 2, quantile=1.5)


def test_references_of_another_product_are_flagged(detector, dataset):
    profile = detector.build_profile("baseline", "disk", train_good(dataset, "disk"))
    same = detector.detect(load_dataset("mvtec", dataset, categories=["disk"])[0].image_path, "disk", profile=profile, method="baseline")
    other = detector.detect(train_good(dataset, "wood", 1)[0], "disk", profile=profile, method="baseline")
    assert same.note is None
    assert "does not look like the reference images" in other.note and other.summary()["note"] == other.note


def test_cli_calibrate_then_predict_with_the_profile_or_references(dataset, tiny_clip_path, tmp_path, capsys):
    category = dataset / "wood"
    common = ["--model", "baseline", "--class-name", "wood", "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE)]
    assert zsad_main(["calibrate", *common, "--normal", str(category / "train" / "good"), "--defective", str(category / "test" / "scratch"),
                      "--masks", str(category / "ground_truth" / "scratch"), "--out", str(tmp_path / "profile")]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 8 good (+ " in printed and "Thresholds (F1-max): image 0." in printed
    assert "Measured on the good images (leave-one-out): " in printed and "no guaranteed rate" in printed
    profile = ProductProfile.load(tmp_path / "profile")
    for option, value in (("--profile", str(tmp_path / "profile")), ("--reference", str(category / "train" / "good"))):
        out = tmp_path / option.strip("-")
        assert zsad_main(["predict", str(category / "test" / "good"), *common, "--out", str(out), option, value]) == 0
        scores = json.loads((out / "scores.json").read_text())
        assert scores["references"] == 8 and scores["calibration"].startswith("calibrated on 8 good")
    assert json.loads((tmp_path / "profile" / "scores.json").read_text())["threshold"] == profile.calibration.image_threshold
    assert zsad_main(["calibrate", *common, "--normal", str(category), "--masks", "x", "--out", str(tmp_path / "p2")]) == 2


def test_evaluate_with_shots_reports_mean_and_std_over_seeds_next_to_zero_shot(dataset, tiny_clip_path, tmp_path):
    parser = argparse.ArgumentParser()
    add_evaluation_arguments(parser)
    args = parser.parse_args(["--model", "baseline", "--dataset", "mvtec", "--root", str(dataset), "--out", str(tmp_path),
                              "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE), "--shots", "2", "--seeds", "2"])
    paths = evaluate(args)
    report = json.loads(paths["json"].read_text())
    few = report["few_shot"]
    assert few["shots"] == 2 and few["seeds"] == [0, 1] and len(few["per_seed"]) == 2
    per_seed = [seed["mean"]["pixel_auroc"] for seed in few["per_seed"]]
    assert few["mean"]["pixel_auroc"] == pytest.approx(np.mean(per_seed)) and few["std"]["pixel_auroc"] == pytest.approx(np.std(per_seed))
    assert few["mean"]["pixel_auroc"] > report["mean"]["pixel_auroc"]
    assert "2-shot, 2 seeds (mean ± std)" in paths["markdown"].read_text() and paths["few_shot_figure"].stat().st_size > 5000


def test_evaluate_with_shots_needs_a_train_split(tmp_path):
    root = generate(tmp_path / "data", categories=["disk"], num_good=1, num_defective=1, image_size=32, num_train_good=1)
    with pytest.raises(ZSADError, match="--shots 2 needs at least that many"):
        evaluate_few_shot("baseline", "mvtec", root, shots=2)


def hand_built_sources(method: torch.Tensor, reference: torch.Tensor, global_score: float = 0.2) -> SourceMaps:
    return SourceMaps(method, reference, torch.full((method.shape[0],), global_score), torch.zeros(method.shape[0]))


def test_fusion_scale_standardises_each_source_on_the_good_images_pixels():
    method = torch.linspace(0.0, 1.0, 10_000).view(1, 100, 100)  # a softmax map spread over [0, 1]
    reference = 0.2 + 0.01 * torch.linspace(0.0, 1.0, 10_000).view(1, 100, 100)  # distances in a narrow band
    scale = FusionScale.from_good([hand_built_sources(method, reference)], weight=0.5)
    values = method.flatten().numpy()
    assert scale.method_location == pytest.approx(np.median(values), abs=1e-6)
    assert scale.method_spread == pytest.approx(np.quantile(values, 0.99) - np.median(values), abs=1e-6)
    assert scale.reference_location == pytest.approx(0.205, abs=1e-6)
    assert scale.reference_spread == pytest.approx(0.0099 - 0.005, abs=1e-6)
    # A pixel at both good 99% quantiles lands on 0.5; at both medians on sigmoid(-4).
    highs = (scale.method_location + scale.method_spread, scale.reference_location + scale.reference_spread)
    test = hand_built_sources(torch.tensor([[[highs[0], scale.method_location]]]), torch.tensor([[[highs[1], scale.reference_location]]]))
    fused = scale.fuse(test, map_weight=0.5)
    torch.testing.assert_close(fused.anomaly_map, torch.tensor([[[0.5, 1.0 / (1.0 + math.exp(4.0))]]]))
    assert fused.image_score.item() == pytest.approx(0.5 * 0.2 + 0.5 * 0.5)
    # The reference map's small differences count as much as the method map's large ones: a pixel 0.01 above the
    # reference median moves the fused value as far as one 0.99 above the method median does.
    ref_step = hand_built_sources(torch.tensor([[[scale.method_location]]]), torch.tensor([[[0.205 + scale.reference_spread]]]))
    method_step = hand_built_sources(torch.tensor([[[scale.method_location + scale.method_spread]]]), torch.tensor([[[0.205]]]))
    torch.testing.assert_close(scale.fuse_maps(ref_step), scale.fuse_maps(method_step))
    # One reference: nothing to standardise on, the raw maps are fused with the weight.
    raw = FusionScale(0.25).fuse_maps(hand_built_sources(torch.tensor([[[0.8]]]), torch.tensor([[[0.4]]])))
    assert not FusionScale(0.25).is_standardised and raw.item() == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)


def test_the_weight_is_chosen_on_defective_images_and_their_masks():
    generator = torch.Generator().manual_seed(0)
    noise = [torch.rand(1, 16, 16, generator=generator) * 0.1 for _ in range(6)]
    good = [hand_built_sources(noise[0], noise[1]), hand_built_sources(noise[2], noise[3])]
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 4:8] = True
    elsewhere = torch.roll(mask, shifts=8, dims=1)
    scale = FusionScale.from_good(good, weight=0.5)
    # The reference map marks the defect, the method map another region: references only.
    bad = [hand_built_sources(noise[4] + 0.5 * elsewhere, noise[5] + 0.5 * mask)]
    assert choose_weight(scale, good, bad, [mask.numpy()]) == 1.0
    # The method map marks the defect, the reference map another region far more: the method's map only.
    bad = [hand_built_sources(noise[4] + 0.5 * mask, noise[5] + 5.0 * elsewhere)]
    assert choose_weight(scale, good, bad, [mask.numpy()]) == 0.0
    # Without masks, by image F1: the reference map's maximum separates the images, the method's does not.
    bad = [hand_built_sources(noise[4], noise[5] + 0.5 * mask)]
    assert choose_weight(scale, good, bad) == 1.0


def test_a_profile_of_format_1_is_refused_with_what_to_do(tmp_path):
    memory = ReferenceMemory([1], [torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)], 2, 28, 1)
    profile = ProductProfile("baseline", "disk", memory, None, "clip", None, FusionScale(1.0, 0.1, 0.2, 0.3, 0.4))
    profile.save(tmp_path / "profile")
    again = ProductProfile.load(tmp_path / "profile")
    assert again.fusion == profile.fusion and again.memory.vv_attention_from == 1
    meta = json.loads((tmp_path / "profile" / "profile.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "profile" / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ZSADError, match="format 1, which fused raw maps.*Build it again"):
        ProductProfile.load(tmp_path / "profile")
