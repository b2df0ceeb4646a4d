"""Calibrated false-alarm rates (issue 32): the split-conformal threshold, its refusal with too few good images, the
bound every calibration states, adding references (equal to calibrating on the union), and the rate on every surface:
the CLI summary, scores.json, the profile's card and the Space's report."""

import json

import numpy as np
import pytest
import torch

from zsad import AnomalyDetector, ProductProfile, ZSADError
from zsad.data.synthetic import generate
from zsad.detection.conformal import conformal_rank, conformal_threshold, good_images_needed, rate_in_words
from zsad.detection.profile import Calibration, calibrate, quantile_rule_rank
from zsad_cli import main as zsad_main

from conftest import TEST_IMAGE_SIZE


@pytest.fixture(scope="module")
def good_parts(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("conformal"), categories=["disk"], num_good=2, num_defective=2, image_size=64, seed=3,
                    num_train_good=10)
    return sorted(str(path) for path in (root / "disk" / "train" / "good").glob("*.png")), root / "disk"


@pytest.fixture(scope="module")
def twenty_one_good_parts(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("conformal21"), categories=["disk"], num_good=1, num_defective=1, image_size=64,
                    seed=4, num_train_good=21)
    return sorted(str(path) for path in (root / "disk" / "train" / "good").glob("*.png")), root / "disk"


@pytest.fixture(scope="module")
def detector(tiny_backbone):
    return AnomalyDetector.load(clip=tiny_backbone, image_size=TEST_IMAGE_SIZE)


# ----- the conformal index ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "rate", "rank", "words"), [
    (4, 0.2, 4, "1 in 5"),      # ceil(5 * 0.8) = 4 = n: the largest score
    (9, 0.2, 8, "1 in 5"),      # ceil(10 * 0.8) = 8: 2 of 10
    (10, 0.2, 9, "2 in 11"),    # ceil(11 * 0.8) = ceil(8.8) = 9
    (19, 0.05, 19, "1 in 20"),  # (n + 1)(1 - rate) = 19 exactly, though 20 * 0.95 is not exact in floats
    (39, 0.05, 38, "1 in 20"),  # ceil(38) = 38: 2 of 40
    (99, 0.01, 99, "1 in 100"),
])
def test_the_conformal_rank_and_threshold_for_small_n(n, rate, rank, words):
    assert conformal_rank(n, rate) == rank and rate_in_words(n, rank) == words
    scores = np.random.default_rng(n).permutation(np.linspace(0.1, 0.9, n))
    found = conformal_threshold(scores, rate)
    kth = np.sort(scores)[rank - 1]
    assert found.rank == rank and found.num_good == n and found.bound == pytest.approx((n + 1 - rank) / (n + 1))
    assert found.bound <= rate + 1e-12
    assert kth < found.threshold <= kth + 1e-15  # just above the k-th smallest: exactly the n - k scores above it flagged
    assert int(np.sum(scores >= found.threshold)) == n - rank


def test_too_few_good_images_is_refused_with_the_number_needed_or_the_best_reachable_rate_on_request():
    assert good_images_needed(0.05) == 19 and good_images_needed(0.01) == 99 and good_images_needed(0.2) == 4
    scores = [0.3, 0.1, 0.4, 0.2]
    with pytest.raises(ZSADError, match=r"rate of 0\.05 needs at least 19 good images; 4 were given.*1 in 5.*--allow-higher-rate"):
        conformal_threshold(scores, 0.05)
    higher = conformal_threshold(scores, 0.05, allow_higher_rate=True)
    assert higher.rank == 4 and higher.bound == pytest.approx(1 / 5) and higher.threshold == np.nextafter(0.4, 1)
    for bad in (0, 1, -0.1, float("nan"), True):
        with pytest.raises(ZSADError, match="false-alarm rate must be a number between 0 and 1"):
            conformal_threshold(scores, bad)


def test_the_bound_holds_on_exchangeable_scores():
    """Many draws of n + 1 continuous i.i.d. scores: a new score reaches the threshold with probability (n + 1 - k)/(n + 1)
    exactly, so the empirical rate sits at the bound (within sampling error) and never clearly above it."""
    rng = np.random.default_rng(0)
    for n, rate in ((9, 0.2), (19, 0.1), (39, 0.05)):
        draws = rng.random((4000, n + 1))
        flagged = [draw[n] >= conformal_threshold(draw[:n], rate).threshold for draw in draws]
        bound = conformal_threshold(draws[0, :n], rate).bound
        assert np.mean(flagged) == pytest.approx(bound, abs=0.025)


def test_the_good_quantile_rule_states_its_bound_and_f1_max_states_the_measured_rate():
    assert quantile_rule_rank(8, 1.0, 0.01) == 8 and quantile_rule_rank(8, 1.0, 0.0) == 7 and quantile_rule_rank(9, 0.75, 0.0) == 6
    maps = [np.full((4, 4), v) for v in (0.2, 0.3, 0.4, 0.5)]
    default = calibrate([0.1, 0.2, 0.3, 0.4], maps)
    assert default.rank == 4 and default.false_alarm_bound == pytest.approx(0.2)
    assert default.describe() == "calibrated on 4 good images: at most 1 in 5 good parts flagged"
    conformal = calibrate([0.1, 0.2, 0.3, 0.4], maps, false_alarm_rate=0.05, allow_higher_rate=True)
    assert conformal.rule == "conformal" and conformal.pixel_threshold == np.nextafter(0.5, 1)
    assert conformal.describe() == ("calibrated on 4 good images: at most 1 in 5 good parts flagged (asked 0.05, which needs 19 "
                                    "good images)")
    labelled = calibrate([0.1, 0.5], maps[:2], [0.45, 0.9], maps[2:])
    assert labelled.rule == "F1-max" and labelled.false_alarm_bound is None
    assert labelled.describe() == ("calibrated on 2 good (+ 2 defective) images: F1-max, 1 of 2 good images flagged leave-one-out "
                                   "(no guaranteed rate)")
    with pytest.raises(ValueError, match="is not"):  # a profile.json whose bound does not follow from n and k
        Calibration(0.5, 0.5, "conformal", [0.1, 0.2, 0.3], rank=3, false_alarm_bound=0.1)


# ----- profiles, adding references, every surface ---------------------------------------------------------------


def test_a_profile_at_a_rate_uses_the_conformal_threshold_on_its_leave_one_out_scores(detector, good_parts):
    files, _ = good_parts
    profile = detector.build_profile("baseline", "disk", files[:9], false_alarm_rate=0.2)
    calibration = profile.calibration
    assert calibration.rule == "conformal" and calibration.rank == 8 and calibration.false_alarm_bound == pytest.approx(0.2)
    assert calibration.image_threshold == np.nextafter(sorted(calibration.good_scores)[7], 1)
    with pytest.raises(ZSADError, match="needs at least 19 good images; 9 were given"):
        detector.build_profile("baseline", "disk", files[:9], false_alarm_rate=0.05)


def test_adding_references_equals_calibrating_on_the_union(detector, good_parts, tmp_path):
    files, _ = good_parts
    first = detector.build_profile("baseline", "disk", files[:4], false_alarm_rate=0.2)
    first.save(tmp_path / "first")
    added = detector.add_references(ProductProfile.load(tmp_path / "first"), files[4:])
    union = detector.build_profile("baseline", "disk", files, false_alarm_rate=0.2)
    assert added.num_references == union.num_references == len(files)
    for mine, theirs in zip(added.memory.features, union.memory.features):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(added.calibration.good_scores, union.calibration.good_scores, atol=1e-6)
    assert added.calibration.rank == union.calibration.rank == 9  # ceil(11 * 0.8) = 9 of 10
    assert added.calibration.image_threshold == pytest.approx(union.calibration.image_threshold, abs=1e-6)
    assert added.calibration.pixel_threshold == pytest.approx(union.calibration.pixel_threshold, abs=1e-6)
    for field in ("method_location", "method_spread", "reference_location", "reference_spread"):
        assert getattr(added.fusion, field) == pytest.approx(getattr(union.fusion, field), abs=1e-6)
    labelled = detector.build_profile("baseline", "disk", files[:4], files[4:6])
    with pytest.raises(ZSADError, match="chosen on defective images"):
        detector.add_references(labelled, files[6:])


def test_cli_states_the_rate_in_its_summary_scores_json_and_the_profile_card_and_adds_references(good_parts, tiny_clip_path,
                                                                                                 tmp_path, capsys):
    files, category = good_parts
    common = ["--model", "baseline", "--clip", str(tiny_clip_path), "--image-size", str(TEST_IMAGE_SIZE)]
    profile_dir = tmp_path / "profile"
    assert zsad_main(["calibrate", *common, "--class-name", "disk", "--normal", *files[:4], "--out", str(profile_dir),
                      "--false-alarm-rate", "0.1"]) == 2
    assert "needs at least 9 good images; 4 were given" in capsys.readouterr().err
    assert zsad_main(["calibrate", *common, "--class-name", "disk", "--normal", *files[:4], "--out", str(profile_dir),
                      "--false-alarm-rate", "0.1", "--allow-higher-rate"]) == 0
    printed = capsys.readouterr().out
    assert "at most 1 in 5 good parts flagged (asked 0.1, which needs 9 good images)" in printed
    assert "Thresholds (conformal, false-alarm rate 0.1 asked)" in printed and "Measured on the good images (leave-one-out): " in printed
    card = (profile_dir / "README.md").read_text()
    assert "at most 1 in 5 good parts flagged" in card and "same process" in card
    assert zsad_main(["calibrate", *common, "--add", *files[4:], "--out", str(profile_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Added 6 good images to the 4 references; before: at most 1 in 5 good parts flagged" in printed
    assert "calibrated on 10 good images: at most 1 in 11 good parts flagged" in printed  # ceil(11 * 0.9) = 10 of 10
    profile = ProductProfile.load(profile_dir)
    assert profile.calibration.false_alarm_bound == pytest.approx(1 / 11) and profile.calibration.false_alarm_target == 0.1
    assert "at most 1 in 11 good parts flagged" in (profile_dir / "README.md").read_text()
    out = tmp_path / "predictions"
    assert zsad_main(["predict", str(category / "test" / "good"), *common, "--class-name", "disk", "--profile", str(profile_dir),
                      "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["false_alarm_bound"] == pytest.approx(1 / 11) and "at most 1 in 11 good parts flagged" in scores["calibration"]
    assert "at most 1 in 11 good parts flagged" in capsys.readouterr().out


def test_the_space_report_states_the_rate_chosen_in_the_reference_box(detector, good_parts):
    import gradio as gr

    from zsad.space import handlers
    from zsad.space.testing import upload as handle_file

    files, category = good_parts
    detect = handlers.make_handler(detector)
    image = handle_file(str(next((category / "test").rglob("*.png"))))
    references = [handle_file(path) for path in files[:9]]
    lowest = detect(image, "disk", "baseline", 0.5, references).report
    assert "9 reference images of good parts; calibrated on 9 good images: at most 1 in 10 good parts flagged; image threshold" in lowest
    one_in_five = detect(image, "disk", "baseline", 0.5, references, False, handlers.CALIBRATED, "1 in 5").report
    assert "calibrated on 9 good images: at most 1 in 5 good parts flagged; image threshold" in one_in_five
    with pytest.raises(gr.Error, match="needs at least 9 good images; 4 were given"):
        detect(image, "disk", "baseline", 0.5, references[:4], False, handlers.CALIBRATED, "1 in 10")
    with pytest.raises(gr.Error, match="false-alarm rate must be one of lowest, 1 in 20, 1 in 10, 1 in 5"):
        detect(image, "disk", "baseline", 0.5, references, False, handlers.CALIBRATED, "0.05")


def test_the_space_reaches_one_in_twenty_with_nineteen_references_and_refuses_more_than_its_cap(detector, twenty_one_good_parts):
    import gradio as gr

    from zsad.space import config, handlers
    from zsad.space.testing import upload as handle_file

    files, category = twenty_one_good_parts
    detect = handlers.make_handler(detector)
    image = handle_file(str(next((category / "test").rglob("*.png"))))
    references = [handle_file(path) for path in files]
    assert config.MAX_REFERENCES == 20
    report = detect(image, "disk", "baseline", 0.5, references[:19], False, handlers.CALIBRATED, "1 in 20").report
    assert "19 reference images of good parts; calibrated on 19 good images: at most 1 in 20 good parts flagged" in report
    with pytest.raises(gr.Error, match="needs at least 19 good images; 18 were given"):
        detect(image, "disk", "baseline", 0.5, references[:18], False, handlers.CALIBRATED, "1 in 20")
    with pytest.raises(gr.Error, match="21 reference images were given; at most 20 are used"):
        detect(image, "disk", "baseline", 0.5, references, False, handlers.CALIBRATED, "1 in 20")
    assert "1 in 20 (needs 19 references), 1 in 10 (needs 9 references), 1 in 5 (needs 4 references)" in handlers.rate_choice_info()


def test_the_larger_reference_cap_keeps_the_decoded_pixel_budget_of_sixteen_display_size_images():
    from zsad.modeling.image_processing_zsad import KEPT_SHORT_SIDE
    from zsad.space.config import DISPLAY_SIDE, ReferenceCaps

    caps = ReferenceCaps()
    assert caps.max_images * caps.max_side**2 <= 16 * DISPLAY_SIDE**2  # 20 x 894^2 = 15.98 MP
    assert caps.max_side == 894 and caps.max_side >= KEPT_SHORT_SIDE  # still above the 518 px the largest model sees
