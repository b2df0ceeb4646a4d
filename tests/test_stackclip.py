"""StackCLIP: CSP clustering and stacking, EFA weights and heads, RPL, text caching (tiny CLIP, offline); the checks
every model passes (saving, loading, remote code, bad names, outputs) are in test_models_common.py."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.testing_utils import CaptureLogger

from zsad import StackCLIPConfig, ZSADError
from zsad.modeling import modeling_stackclip, stacking
from zsad.modeling.prompting import STATE_WORDS, TEMPLATES, TEXT_TOKENS_PER_CHUNK, prompt_ensemble_features

from conftest import TEST_IMAGE_SIZE, tiny_model

TRAIN_NAMES = ["bottle", "cable", "capsule", "screw", "metal_nut", "pill"]


def untrained(backbone, **overrides):
    return tiny_model("stackclip", backbone, **overrides)


@pytest.fixture(scope="module")
def two_cluster_model(tiny_backbone):
    """Untrained, clustered into two on TRAIN_NAMES; copy it (``prepared``) before changing it."""
    model = untrained(tiny_backbone, num_clusters=2)
    model.prepare_for_training(TRAIN_NAMES)
    return model.eval()


@pytest.fixture
def prepared(two_cluster_model):
    return copy.deepcopy(two_cluster_model)


# ----- CSP: clustering ----------------------------------------------------------------------


def cosine_structured_features(group_sizes: list[int], across: float, within: float) -> np.ndarray:
    """Unit vectors, one row per item, whose pairwise cosine is exactly ``within`` inside a group and ``across``
    between groups: sqrt(across) * shared axis + sqrt(within - across) * group axis + sqrt(1 - within) * own axis."""
    count = sum(group_sizes)
    features = np.zeros((count, 1 + len(group_sizes) + count))
    features[:, 0] = math.sqrt(across)
    groups = np.repeat(np.arange(len(group_sizes)), group_sizes)
    features[np.arange(count), 1 + groups] = math.sqrt(within - across)
    features[np.arange(count), 1 + len(group_sizes) + np.arange(count)] = math.sqrt(1.0 - within)
    return features


def inertia(size: int, ordered_pair_cosines: float) -> float:
    """Sum of squared distances to the mean of ``size`` unit vectors: |T| - (1/|T|) sum_{s,t in T} <s, t>."""
    return size - (size + ordered_pair_cosines) / size


FAST = {"max_clusters": 4, "n_init": 4}  # scikit-learn's k-means costs ~0.1 s per fit here
VISA_NAMES = ["pcb1", "pcb2", "pcb3", "pcb4", "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
              "macaroni2", "pipe_fryum"]


def test_sum_criterion_keeps_fifteen_evenly_similar_names_in_one_cluster():
    # Equal cosines 0.75: every partition into n clusters has inertia (15 - n)(1 - 0.75), so each extra cluster saves
    # 0.25 while the penalty grows by 0.1 (e^(n+1) - e^n) >= 0.47.
    features = cosine_structured_features([1] * 15, across=0.75, within=0.75)
    clustering = stacking.cluster_categories(features, [f"c{i}" for i in range(15)], **FAST, spread="sum")
    assert list(clustering.count_scores) == [1, 2, 3, 4]
    for count, score in clustering.count_scores.items():
        assert score == pytest.approx((15 - count) * 0.25 + 0.1 * math.exp(count))
    assert clustering.count_scores[1] == pytest.approx(3.5 + 0.1 * math.e)  # 3.772 < 3.989 for n = 2
    assert len(clustering.members) == 1


def test_sum_criterion_splits_four_near_duplicates_from_eight_spread_names_and_mean_does_not(caplog):
    # VisA-like: pcb1-4 at cosine 0.95 to each other, everything else at 0.75.
    features = cosine_structured_features([4] + [1] * 8, across=0.75, within=0.95)
    one_cluster = inertia(12, 12 * 0.95 + 120 * 0.75)  # 2.55
    pcb, rest = inertia(4, 12 * 0.95), inertia(8, 56 * 0.75)  # 0.15 and 1.75
    with caplog.at_level(logging.INFO, logger="zsad"):
        clustering = stacking.cluster_categories(features, VISA_NAMES, **FAST, spread="sum")
    assert "2 cluster(s) for 12 categories" in caplog.text and "n=1: 2.8218, n=2: 2.6389, n=3: 3.6586" in caplog.text
    assert clustering.count_scores[1] == pytest.approx(one_cluster + 0.1 * math.e)  # 2.822
    assert clustering.count_scores[2] == pytest.approx(pcb + rest + 0.1 * math.e**2)  # 2.639
    assert clustering.count_scores[3] == pytest.approx(pcb + inertia(7, 42 * 0.75) + 0.1 * math.e**3)  # 3.659
    assert [sorted(members) for members in clustering.members] == [VISA_NAMES[:4], sorted(VISA_NAMES[4:])]

    mean = stacking.cluster_categories(features, VISA_NAMES, **FAST, spread="mean")
    assert mean.count_scores[1] == pytest.approx(one_cluster / 12 + 0.1 * math.e)  # 0.484
    assert mean.count_scores[2] == pytest.approx(pcb / 4 + rest / 8 + 0.1 * math.e**2)  # 0.995
    assert len(mean.members) == 1


def test_sum_criterion_finds_three_groups_and_mean_cannot():
    # Three groups of four: cosine 0.9 inside a group, 0.3 across.
    features = cosine_structured_features([4, 4, 4], across=0.3, within=0.9)
    names = [f"{group}{i}" for group in "abc" for i in range(4)]
    group = inertia(4, 12 * 0.9)  # 0.3
    two_groups = inertia(8, 24 * 0.9 + 32 * 0.3)  # 3.1
    everything = inertia(12, 36 * 0.9 + 96 * 0.3)  # 5.9
    clustering = stacking.cluster_categories(features, names, **FAST, spread="sum")
    assert clustering.count_scores[1] == pytest.approx(everything + 0.1 * math.e)
    assert clustering.count_scores[2] == pytest.approx(two_groups + group + 0.1 * math.e**2)
    assert clustering.count_scores[3] == pytest.approx(3 * group + 0.1 * math.e**3)
    assert [sorted(members) for members in clustering.members] == [names[:4], names[4:8], names[8:]]

    mean = stacking.cluster_categories(features, names, **FAST, spread="mean")
    assert mean.count_scores[3] == pytest.approx(3 * group / 4 + 0.1 * math.e**3)
    assert len(mean.members) == 1  # n = 3 costs 0.1 e^3 = 2.01 > 1 + 0.1 e >= any n = 1 score


def test_mean_criterion_matches_hand_computed_values_and_picks_one_cluster_for_three_directions():
    # Three categories on three orthogonal axes: one cluster has mean spread 3 * (1 - 2/3 + 1/3) / 3 = 2/3.
    features = np.eye(3)
    clustering = stacking.cluster_categories(features, ["a", "b", "c"], n_init=4, seed=0, spread="mean")
    assert clustering.count_scores[1] == pytest.approx(2 / 3 + 0.1 * math.e)
    # Two clusters: {x, y} has mean spread 1/2, the singleton 0.
    assert clustering.count_scores[2] == pytest.approx(0.5 + 0.1 * math.e**2)
    assert clustering.count_scores[3] == pytest.approx(0.1 * math.e**3)
    assert len(clustering.members) == 1 and sorted(clustering.members[0]) == ["a", "b", "c"]
    # The inertia of the same fits: 2 for one cluster, 1 for two, so "sum" splits the orthogonal pair off.
    inertia_fit = stacking.cluster_categories(features, ["a", "b", "c"], n_init=4, seed=0, spread="sum")
    assert inertia_fit.count_scores[1] == pytest.approx(2 + 0.1 * math.e)
    assert inertia_fit.count_scores[2] == pytest.approx(1 + 0.1 * math.e**2)
    assert len(inertia_fit.members) == 2


def test_two_opposite_groups_form_two_clusters_with_the_right_members_nearest_first():
    rng = np.random.default_rng(0)
    axis = np.array([1.0, 0.0, 0.0])
    group_a = axis + 0.01 * rng.standard_normal((3, 3))
    group_b = -axis + 0.01 * rng.standard_normal((3, 3))
    outlier_of_a = axis + np.array([0.0, 0.3, 0.0])  # still nearest to group a, but farthest from its centre
    features = np.vstack([group_a[:1], group_b, outlier_of_a, group_a[1:]])
    names = ["a0", "b0", "b1", "b2", "a_far", "a1", "a2"]
    clustering = stacking.cluster_categories(features, names, seed=0)
    assert len(clustering.members) == 2
    assert clustering.count_scores[2] < clustering.count_scores[1]
    # Clusters in order of first appearance; members nearest to the centroid first.
    assert sorted(clustering.members[0]) == ["a0", "a1", "a2", "a_far"] and clustering.members[0][-1] == "a_far"
    assert sorted(clustering.members[1]) == ["b0", "b1", "b2"]
    np.testing.assert_allclose(clustering.centroids[1], features[1:4].mean(axis=0), atol=1e-9)


def test_forced_cluster_count_is_used():
    features = np.eye(4)
    clustering = stacking.cluster_categories(features, list("abcd"), num_clusters=2, seed=0)
    assert len(clustering.members) == 2 and list(clustering.count_scores) == [2]
    assert sorted(sum(clustering.members, [])) == list("abcd")


# ----- CSP: stacked names -------------------------------------------------------------------


def _longest_prompt_tokens(name, tokenizer):
    prompts = [template.format(state.format(name)) for states in STATE_WORDS for state in states for template in TEMPLATES]
    return max(len(ids) for ids in tokenizer(prompts)["input_ids"])


def test_stacked_name_joins_members_with_spaces(tiny_backbone):
    assert stacking.stacked_name(["bottle", "cable", "metal nut"], tiny_backbone.tokenizer) == "bottle cable metal nut"


def test_stacked_name_is_cut_to_the_token_window_and_logs_it(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    members = [f"{word} {index}" for index in range(40) for word in ("toothbrush",)]
    with CaptureLogger(stacking.logger) as captured:
        name = stacking.stacked_name(members, tokenizer, context_length=77)
    kept = name.split(" toothbrush ")
    assert 1 < len(kept) < len(members)
    assert name == " ".join(members[: len(kept)])
    assert _longest_prompt_tokens(name, tokenizer) <= 77
    assert _longest_prompt_tokens(" ".join(members[: len(kept) + 1]), tokenizer) > 77  # the cut is tight
    assert "cut" in captured.out and members[len(kept)] in captured.out


def test_a_single_overlong_name_is_cut_word_by_word(tiny_backbone):
    long_name = " ".join(["transistor"] * 60)
    name = stacking.stacked_name([long_name, "cable"], tiny_backbone.tokenizer)
    assert long_name.startswith(name) and 0 < len(name) < len(long_name)
    assert _longest_prompt_tokens(name, tiny_backbone.tokenizer) <= 77


def test_model_clusters_training_categories_and_stores_stacked_features(two_cluster_model, tiny_backbone):
    model = two_cluster_model
    members = model.config.cluster_members
    assert len(members) == 2 and sorted(sum(members, [])) == sorted(name.replace("_", " ") for name in TRAIN_NAMES)
    assert model.config.stacked_names == [" ".join(group) for group in members]
    expected = prompt_ensemble_features(tiny_backbone, model.config.stacked_names)
    torch.testing.assert_close(model.stacked_text, expected.float())
    assert model.cluster_centroids.shape == (2, tiny_backbone.model.config.projection_dim)
    assert len(model.efa_heads) == 2 and all(len(heads) == 4 for heads in model.efa_heads)


def test_fusion_is_the_normalised_weighted_sum():
    stacked = F.normalize(torch.randn(3, 2, 8), dim=-1)
    precise = F.normalize(torch.randn(5, 2, 8), dim=-1)
    fused = stacking.fuse_text_features(stacked, precise, 0.3)
    assert fused.shape == (5, 3, 2, 8)
    torch.testing.assert_close(fused[4, 1, 0], F.normalize(0.3 * stacked[1, 0] + 0.7 * precise[4, 0], dim=0))
    torch.testing.assert_close(stacking.fuse_text_features(stacked, precise, 1.0)[2], stacked)


# ----- EFA ----------------------------------------------------------------------------------


def test_ensemble_weights_sum_to_one_and_favour_the_nearest_centroid():
    centroids = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    classes = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9]])
    weights = stacking.cluster_weights(classes, centroids, temperature=0.1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    assert weights.argmax(dim=1).tolist() == [0, 2]
    assert weights[0, 0] > 0.9
    cos = F.normalize(classes, dim=-1) @ F.normalize(centroids, dim=-1).t()
    torch.testing.assert_close(weights, (cos / 0.1).softmax(dim=-1))


def test_untrained_heads_equal_clips_projected_patch_tokens(two_cluster_model, tiny_backbone, pixels):
    model = two_cluster_model
    features = model.encode_image(pixels)
    tokens = features.patch_tokens(2)
    for heads in model.efa_heads:
        torch.testing.assert_close(heads[2](tiny_backbone.post_layernorm(tokens)), tiny_backbone.project_patch_tokens(tokens))


@pytest.mark.parametrize("fusion_weight", [0.5, 0.9])
def test_with_one_training_category_the_untrained_map_is_the_baselines(tiny_backbone, pixels, fusion_weight):
    model = untrained(tiny_backbone, fusion_weight=fusion_weight).eval()
    model.prepare_for_training(["bottle"])
    baseline = tiny_model("baseline", tiny_backbone)
    with torch.no_grad():
        ours, reference = model(pixels, "bottle"), baseline(pixels, "bottle")
    torch.testing.assert_close(ours.anomaly_map, reference.anomaly_map)
    torch.testing.assert_close(ours.layer_maps, reference.layer_maps)


def test_eval_weights_are_soft_and_training_routes_members_to_their_cluster(prepared):
    model = prepared
    member = model.config.cluster_members[1][0]
    names = [member, "candle"]
    with torch.no_grad():
        soft = model.eval().ensemble_weights(names)
        routed = model.train().ensemble_weights(names)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(2))
    assert (soft > 0).all() and (soft < 1).all()
    assert routed[0].tolist() == [0.0, 1.0]
    torch.testing.assert_close(routed[1], soft[1])  # an unseen name keeps its soft weights


GROUP_A, GROUP_B = ["bottle", "cable", "screw"], ["wood", "tile", "grid"]


def two_group_class_features(dim: int) -> dict[str, torch.Tensor]:
    """Class features of two well-separated name groups (near e0 and near e1) and of "candle", between them."""
    eye = torch.eye(dim)
    features = {name: eye[0] + 0.1 * eye[2 + i] for i, name in enumerate(GROUP_A)}
    features.update({name: eye[1] + 0.1 * eye[5 + i] for i, name in enumerate(GROUP_B)})
    features["candle"] = eye[0] + 0.8 * eye[1]
    return {name: F.normalize(feature, dim=0) for name, feature in features.items()}


def test_two_name_groups_get_two_head_sets_routed_in_training_and_mixed_by_softmax_weights(
    tiny_backbone, pixels, monkeypatch
):
    features = two_group_class_features(tiny_backbone.model.config.projection_dim)
    monkeypatch.setattr(
        modeling_stackclip, "class_prompt_features", lambda backbone, names: torch.stack([features[n] for n in names])
    )
    model = untrained(tiny_backbone, max_clusters=3, kmeans_n_init=4)  # the criterion chooses
    model.prepare_for_training(GROUP_A + GROUP_B)
    assert sorted(map(sorted, model.config.cluster_members)) == [sorted(GROUP_A), sorted(GROUP_B)]
    assert len(model.efa_heads) == 2
    scores = model.config.cluster_count_scores
    assert list(scores) == ["1", "2", "3"] and min(scores, key=scores.get) == "2"
    with torch.no_grad():
        model.efa_heads[1][0].bias.add_(0.5)  # cluster B's heads differ from cluster A's
        routed = model.train().ensemble_weights(["screw", "tile", "wood", "bottle"])
    first_of_a = 0 if "bottle" in model.config.cluster_members[0] else 1
    own = [first_of_a, 1 - first_of_a, 1 - first_of_a, first_of_a]
    assert routed.tolist() == F.one_hot(torch.tensor(own), 2).float().tolist()

    model.eval()
    members = [torch.stack([features[name] for name in names]) for names in model.config.cluster_members]
    centroids = F.normalize(torch.stack([group.mean(dim=0) for group in members]), dim=-1)
    expected = (features["candle"] @ centroids.t() / 0.1).softmax(dim=0)  # softmax(cos / tau)
    assert 0.05 < expected.min() < 0.5  # a real mixture, not one cluster
    with torch.no_grad():
        mixed = model(pixels, "candle")
        torch.testing.assert_close(mixed.cluster_weights, expected.expand(2, 2))
        per_cluster = []
        for cluster in range(2):
            one_hot = F.one_hot(torch.tensor([cluster, cluster]), 2).float()
            monkeypatch.setattr(model, "ensemble_weights", lambda names, weights=one_hot: weights)
            per_cluster.append(model(pixels, "candle"))
    assert (per_cluster[0].anomaly_map - per_cluster[1].anomaly_map).abs().max() > 1e-3
    torch.testing.assert_close(
        mixed.anomaly_map, expected[0] * per_cluster[0].anomaly_map + expected[1] * per_cluster[1].anomaly_map
    )
    torch.testing.assert_close(
        mixed.layer_maps, expected[0] * per_cluster[0].layer_maps + expected[1] * per_cluster[1].layer_maps
    )


@pytest.mark.parametrize("mode, other_cluster_learns", [("cluster-specific", False), ("all-data", True)])
def test_efa_training_mode_decides_which_heads_learn(prepared, pixels, mode, other_cluster_learns):
    model = prepared.train()
    model.config.efa_training = mode
    member = model.config.cluster_members[0][0]
    masks = torch.zeros(2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    masks[:, 20:50, 30:60] = 1
    model(pixels, member, masks=masks).loss.backward()
    own, other = (sum(p.grad.abs().sum() for p in heads.parameters()) for heads in model.efa_heads)
    assert own > 0
    assert (other > 0) == other_cluster_learns


# ----- RPL ----------------------------------------------------------------------------------


def test_context_starts_from_the_repeated_init_phrase(tiny_backbone):
    model = untrained(tiny_backbone, n_ctx=6, ctx_init="a photo of a")
    ids = tiny_backbone.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    expected_ids = (ids * 6)[-6:]
    expected = tiny_backbone.word_embeddings(torch.tensor(expected_ids))
    torch.testing.assert_close(model.rpl_context[0], expected)
    torch.testing.assert_close(model.rpl_context[1], expected)


def _train_rpl(tiny_backbone, pixels, regularizer_weight, steps=20):
    """Adam with the METHODS.md defaults on the RPL context alone; returns the model and the regulariser per step."""
    model = untrained(tiny_backbone, num_clusters=1, rpl_regularizer_weight=regularizer_weight).train()
    model.prepare_for_training(TRAIN_NAMES)
    optimizer = torch.optim.Adam([model.rpl_context], lr=1e-3, betas=(0.5, 0.999))
    values = []
    for _ in range(steps):
        output = model(pixels, ["bottle", "cable"], labels=torch.tensor([0, 1]))
        values.append(output.rpl_regularizer.item())
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return model, values


def test_rpl_regulariser_falls_during_training(tiny_backbone, pixels):
    # A weight of 10 makes the term's effect clear whatever the tiny random CLIP's weights; the image
    # cross-entropy on noise images pulls the prompts the other way.
    model, values = _train_rpl(tiny_backbone, pixels, regularizer_weight=10.0)
    _, unregulated = _train_rpl(tiny_backbone, pixels, regularizer_weight=0.0)
    assert values[-1] < 0.8 * values[0]
    assert values[-1] < 0.8 * unregulated[-1]  # without the term the prompts drift away from the stacked features
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        output = model(pixels, ["bottle", "cable"], labels=labels)
        learned, stacked = model.rpl_text(), model.stacked_text[0]
    expected = sum(1 - F.cosine_similarity(learned[state], stacked[state], dim=0) for state in (0, 1))
    torch.testing.assert_close(output.rpl_regularizer, expected)


def test_image_score_is_the_mean_of_rpl_probability_and_map_max(tiny_backbone, pixels):
    model = untrained(tiny_backbone).eval()
    with torch.no_grad():
        output = model(pixels, ["bottle", "wood"])
        learned = model.rpl_text()
        rpl_prob = (100 * model.encode_image(pixels).image_embeds @ learned.t()).softmax(dim=-1)[:, 1]
    torch.testing.assert_close(output.global_score, rpl_prob)
    torch.testing.assert_close(output.map_score, output.anomaly_map.flatten(1).amax(dim=1))
    torch.testing.assert_close(output.image_score, (rpl_prob + output.map_score) / 2)


# ----- caching -----------------------------------------------------------------------------


def test_the_order_of_the_training_names_does_not_change_the_clusters_or_the_map(two_cluster_model, tiny_backbone, pixels):
    twin = untrained(tiny_backbone, num_clusters=2).eval()
    twin.prepare_for_training(list(reversed(TRAIN_NAMES)))
    with torch.no_grad():
        first = two_cluster_model(pixels, ["candle", "pcb"])
        torch.testing.assert_close(twin(pixels, ["candle", "pcb"]).anomaly_map, first.anomaly_map, rtol=0, atol=0)
    assert first.cluster_weights.shape == (2, 2)


def _count_text_calls(backbone, monkeypatch) -> list:
    """(prompts encoded, tokens in the batch) of every text-transformer call on ``backbone`` from now on: single
    prompts (``encode_text``) and packed prompt trees (``encode_prompts``)."""
    calls = []
    encode_text, encode_trees = backbone.encode_text, backbone._encode_prefix_trees

    def counted_text(ids, *args, **kwargs):
        calls.append((ids.shape[0], ids.numel()))
        return encode_text(ids, *args, **kwargs)

    def counted_trees(rows):
        calls.append((sum(len(row.last_node) for row in rows), len(rows) * max(len(row) for row in rows)))
        return encode_trees(rows)

    monkeypatch.setattr(backbone, "encode_text", counted_text)
    monkeypatch.setattr(backbone, "_encode_prefix_trees", counted_trees)
    return calls


def test_class_text_is_encoded_once_per_name_and_rpl_text_refreshes_after_a_step(fresh_backbone, pixels, monkeypatch):
    model = untrained(fresh_backbone).eval()
    calls = _count_text_calls(fresh_backbone, monkeypatch)
    with torch.no_grad():
        model(pixels, ["bottle", "cable"])
        first_calls = len(calls)
        model(pixels, ["cable", "bottle"])
        assert len(calls) == first_calls
        model(pixels, ["cable", "wood"])  # only the new name's prompt ensemble is encoded (in bounded chunks)
        prompts_per_name = sum(len(states) for states in STATE_WORDS) * len(TEMPLATES)
        new_calls = calls[first_calls:]
        assert sum(prompts for prompts, _ in new_calls) == prompts_per_name
        assert len(new_calls) > 1 and all(tokens <= TEXT_TOKENS_PER_CHUNK for _, tokens in new_calls)
        first_calls = len(calls)
        before = model.rpl_text()
        model.rpl_context.add_(torch.randn(model.rpl_context.shape, generator=torch.Generator().manual_seed(0)))
        after = model.rpl_text()
    assert len(calls) == first_calls + 1
    assert not torch.allclose(before, after)


def test_baseline_and_stackclip_on_one_backbone_encode_a_names_prompt_ensemble_once(fresh_backbone, pixels,
                                                                                    monkeypatch):
    baseline = tiny_model("baseline", fresh_backbone)
    stackclip = untrained(fresh_backbone).eval()
    calls = _count_text_calls(fresh_backbone, monkeypatch)
    prompts_per_name = sum(len(states) for states in STATE_WORDS) * len(TEMPLATES)
    with torch.no_grad():
        baseline(pixels, "bottle")
        assert sum(prompts for prompts, _ in calls) == prompts_per_name
        calls.clear()
        stackclip(pixels, "bottle")
    assert sum(prompts for prompts, _ in calls) < prompts_per_name  # its own RPL prompts only


def test_prepare_is_idempotent_and_refuses_to_recluster_a_trained_model(prepared):
    model = prepared
    heads = model.efa_heads
    model.config.is_trained = True
    model.prepare_for_training(list(reversed(TRAIN_NAMES)))
    assert model.efa_heads is heads
    with pytest.raises(ZSADError, match="untrained"):
        model.prepare_for_training(["wood", "tile"])


def test_bad_settings_raise_clear_errors():
    assert StackCLIPConfig().cluster_spread == "sum"  # the form that can give VisA's two clusters (METHODS.md)
    with pytest.raises(ZSADError, match="cluster_spread must be one of"):
        StackCLIPConfig(cluster_spread="median")
    with pytest.raises(ZSADError, match="efa_training"):
        StackCLIPConfig(efa_training="everything")
    with pytest.raises(ZSADError, match="fusion_weight"):
        StackCLIPConfig(fusion_weight=1.5)
