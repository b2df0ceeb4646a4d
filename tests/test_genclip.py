"""GenCLIP: prompt layout, MVP, patch heads, CNF, dual-branch fusion, text cache; the checks every model passes
(saving, loading, remote code, bad names, outputs) are in test_models_common.py."""


import pytest
import torch
import torch.nn.functional as F

import zsad
from zsad import GenCLIPConfig, GenCLIPModel, ZSADError
from zsad.modeling.class_name_filter import candidate_logits, decide_class_names, name_probability_and_rank
from zsad.modeling.modeling_genclip import tiled_token_ids

from conftest import TEST_IMAGE_SIZE, tiny_model


@pytest.fixture
def make_model(tiny_backbone):
    def make(**overrides):
        return tiny_model("genclip", tiny_backbone, **overrides)

    return make


@pytest.fixture
def model(make_model):
    return make_model()


def randomise_mvp(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in model.vision_prompts:
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.05)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.05)


# ----- configuration and training-free start -------------------------------------------------------


def test_config_defaults_follow_methods_md():
    config = GenCLIPConfig()
    assert (config.num_state_tokens, config.num_query_tokens) == (4, 4)
    assert (config.cnf_mode, config.cnf_threshold, config.cnf_top_k) == ("hard", 0.2, 3)
    assert config.branch_weight == 0.5 and config.generic_name == "object"
    assert config.optimizer == "adamw"
    # The paper trains every module except CNF and F_Q; the image-level cross-entropy is the project's choice.
    assert config.train_query_branch is False and config.image_loss_weight == 1.0
    assert config.feature_layers == [6, 12, 18, 24] and len(config.cnf_generic_nouns) > 10
    assert zsad.METHODS["genclip"] is GenCLIPModel
    with pytest.raises(ZSADError, match="cnf_mode"):
        GenCLIPConfig(cnf_mode="sometimes")
    with pytest.raises(ZSADError, match="branch_weight"):
        GenCLIPConfig(branch_weight=1.5)
    with pytest.raises(ZSADError, match="image_loss_weight"):
        GenCLIPConfig(image_loss_weight=-1.0)


def test_tiled_token_ids_repeat_or_cut():
    assert tiled_token_ids([7, 8], 5) == [7, 8, 7, 8, 7]
    assert tiled_token_ids([1, 2, 3, 4, 5, 6], 4) == [1, 2, 3, 4]
    assert tiled_token_ids([9], 4) == [9, 9, 9, 9]


def test_learnable_tokens_start_from_word_embeddings(model, tiny_backbone):
    def embeddings_of(text, length):
        ids = tiled_token_ids(tiny_backbone.tokenizer(text, add_special_tokens=False)["input_ids"], length)
        return tiny_backbone.word_embeddings(torch.tensor(ids))

    torch.testing.assert_close(model.query_tokens.data, embeddings_of("a photo of a", 4), rtol=0, atol=0)
    torch.testing.assert_close(model.normal_tokens.data, embeddings_of("flawless", 4), rtol=0, atol=0)
    torch.testing.assert_close(model.abnormal_tokens.data, embeddings_of("damaged", 4), rtol=0, atol=0)
    assert all(not linear.weight.any() and not linear.bias.any() for linear in model.vision_prompts)
    assert not model.training  # from_clip gives a model ready for inference (CNF on)


def test_untrained_patch_heads_are_clips_projection(model, tiny_backbone, pixels):
    features = model.encode_image(pixels)
    for index in range(len(features.layers)):
        expected = F.normalize(tiny_backbone.project_patch_tokens(features.patch_tokens(index)), dim=-1)
        torch.testing.assert_close(model.patch_features(features, index), expected, rtol=0, atol=1e-6)


# ----- prompt layout ---------------------------------------------------------------------------------


def capture_text_embeddings(backbone):
    """Record the token embeddings the text transformer receives (inputs_embeds of its embedding layer)."""
    captured = []
    handle = backbone.model.text_model.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    return captured, handle


def test_prompt_layout_places_state_query_and_vision_tokens(model, tiny_backbone):
    torch.manual_seed(1)
    layers, width = len(model.config.feature_layers), model.config.text_hidden_size
    vision_tokens = torch.randn(1, layers, width)
    captured, handle = capture_text_embeddings(tiny_backbone)
    try:
        with torch.no_grad():
            features = model.encode_prompts(["metal nut"], model.prompt_embeddings(vision_tokens))
    finally:
        handle.remove()
    assert features.shape == (1, layers, 2, model.config.projection_dim)
    (embeds,) = captured
    name_ids = tiny_backbone.tokenizer("metal nut.")["input_ids"]  # [BOS, name tokens ..., EOS]
    words = tiny_backbone.word_embeddings(torch.tensor(name_ids))
    assert embeds.shape[:2] == (layers * 2, len(name_ids) + 8)
    for layer in range(layers):
        for state, state_tokens in enumerate((model.normal_tokens, model.abnormal_tokens)):
            row = embeds[layer * 2 + state]
            torch.testing.assert_close(row[0], words[0], rtol=0, atol=0)  # start token
            torch.testing.assert_close(row[1:5], state_tokens.data, rtol=0, atol=0)  # N_p or A_p
            torch.testing.assert_close(row[5:9], model.query_tokens.data + vision_tokens[0, layer], rtol=0, atol=0)
            torch.testing.assert_close(row[9:], words[1:], rtol=0, atol=0)  # "metal nut." and the end token


def test_query_only_branch_is_state_and_query_tokens_before_object(model, tiny_backbone):
    with torch.no_grad():
        features = model.query_text_features()
        ids = tiny_backbone.tokenize(["object."], num_placeholders=8).expand(2, -1)
        learned = torch.stack(
            [torch.cat([model.normal_tokens, model.query_tokens]), torch.cat([model.abnormal_tokens, model.query_tokens])]
        )
        expected = tiny_backbone.encode_text(ids, replacement=learned, positions=torch.arange(1, 9))
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(features[0], features[1])  # the untrained normal and abnormal prompts differ


# ----- MVP ---------------------------------------------------------------------------------------------


def test_mvp_has_exactly_no_effect_at_initialisation(make_model, pixels):
    model = make_model(cnf_mode="off")
    with torch.no_grad():
        features = model.encode_image(pixels)
        assert not model.vision_prompt_tokens(features).any()
        output = model(pixels, class_names="object")
        decision = model.filter_class_names(["object", "object"], features.image_embeds)
        vision_text = model.vision_text_features(decision, features)
    query_text = model.query_text_features()
    for layer in range(vision_text.shape[1]):
        for image in range(2):
            torch.testing.assert_close(vision_text[image, layer], query_text, rtol=0, atol=1e-6)
    # With the generic name the untrained vision-enhanced branch is the query-only branch.
    torch.testing.assert_close(output.vision_map, output.query_map, rtol=0, atol=1e-5)


def test_mvp_makes_text_features_depend_on_the_image(make_model, pixels):
    model = make_model(cnf_mode="off")
    randomise_mvp(model)
    with torch.no_grad():
        features = model.encode_image(pixels)
        decision = model.filter_class_names(["bottle", "bottle"], features.image_embeds)
        text = model.vision_text_features(decision, features)
        again = model.vision_text_features(decision, model.encode_image(pixels.flip(0)))
    assert (text[0] - text[1]).abs().max() > 1e-4  # two images, two sets of prompts
    assert (text[:, 0] - text[:, 1]).abs().max() > 1e-4  # one text pair per tapped layer
    torch.testing.assert_close(again, text.flip(0), rtol=0, atol=1e-6)  # and they follow the image


# ----- CNF ---------------------------------------------------------------------------------------------


def test_cnf_decision_rule_threshold_or_top_k():
    probabilities = torch.tensor([0.50, 0.10, 0.10, 0.20])
    ranks = torch.tensor([1, 3, 5, 6])
    names = ["bottle", "pcb1", "zz9", "grid"]
    hard = decide_class_names(probabilities, ranks, names, "hard", threshold=0.2, top_k=3, generic_name="object")
    assert hard.kept == [True, True, False, True]  # kept by probability, by rank, neither, probability == threshold
    assert hard.names_used == ["bottle", "pcb1", "object", "grid"]
    assert hard.class_weights.tolist() == [1.0, 1.0, 0.0, 1.0]
    soft = decide_class_names(probabilities, ranks, names, "soft", threshold=0.2, top_k=3, generic_name="object")
    assert soft.names_used == names and soft.kept == hard.kept
    torch.testing.assert_close(soft.class_weights, probabilities)
    off = decide_class_names(None, None, names, "off", threshold=0.2, top_k=3, generic_name="object")
    assert off.names_used == names and off.probabilities is None and off.class_weights.tolist() == [1.0] * 4


def test_cnf_probability_and_rank_by_hand():
    image = torch.tensor([[1.0, 0.0]])
    name = torch.tensor([[0.6, 0.8]])
    generic = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    duplicate = torch.tensor([[False, False, True]])  # the third candidate is the name itself
    logits = candidate_logits(image, name, generic, duplicate, logit_scale=10.0)
    assert logits[0, :3].tolist() == pytest.approx([6.0, 10.0, 0.0]) and logits[0, 3] == float("-inf")
    probability, rank = name_probability_and_rank(logits)
    expected = torch.exp(torch.tensor(6.0)) / (torch.exp(torch.tensor(6.0)) + torch.exp(torch.tensor(10.0)) + 1.0)
    torch.testing.assert_close(probability, expected.reshape(1))
    assert rank.tolist() == [2]


def test_cnf_keeps_a_recognised_name_and_replaces_an_unrecognised_one(model):
    # The frozen CLIP "recognises" a name for an image whose embedding is that name's prompt feature (it is
    # the most similar candidate: rank 1) and not for the opposite embedding (the least similar of all
    # 22 candidates: rank 22 and a probability below 1/22).
    name_feature = model.cnf_name_features(["hazelnut"])
    generic = model.cnf_generic_features()
    assert (generic @ name_feature[0]).max() < 1.0 - 1e-4  # no generic candidate has the same feature
    decision = model.filter_class_names(["hazelnut", "hazelnut"], torch.cat([name_feature, -name_feature]))
    assert decision.kept == [True, False]
    assert decision.names_used == ["hazelnut", "object"]
    assert decision.probabilities[1] < 1.0 / (generic.shape[0] + 1) < model.config.cnf_threshold
    assert decision.class_weights.tolist() == [1.0, 0.0]


def test_cnf_decision_is_reported_and_used_by_the_vision_branch(make_model, pixels):
    model = make_model(cnf_mode="hard", cnf_threshold=1.1, cnf_top_k=0)  # rejects every name
    off = make_model(cnf_mode="off")
    with torch.no_grad():
        rejected = model(pixels, class_names="screw")
        as_object = off(pixels, class_names="object")
    decision = rejected.class_name_decision
    assert decision.mode == "hard" and decision.names_given == ["screw", "screw"]
    assert decision.names_used == ["object", "object"] and decision.kept == [False, False]
    assert decision.probabilities.shape == (2,)
    torch.testing.assert_close(rejected.vision_map, as_object.vision_map, rtol=0, atol=1e-5)
    keeper = make_model(cnf_mode="hard", cnf_threshold=0.0)  # keeps every name
    with torch.no_grad():
        assert keeper(pixels, class_names="screw").class_name_decision.names_used == ["screw", "screw"]


def test_cnf_soft_weights_lie_in_unit_interval_and_interpolate_features(make_model, pixels):
    model = make_model(cnf_mode="soft")
    randomise_mvp(model)
    with torch.no_grad():
        output = model(pixels, class_names=["bottle", "qq7x"])
        features = model.encode_image(pixels)
        decision = model.filter_class_names(["bottle", "qq7x"], features.image_embeds)
        decision.class_weights = torch.tensor([0.25, 1.0])
        soft = model.vision_text_features(decision, features)
        embeddings = model.prompt_embeddings(model.vision_prompt_tokens(features))
        with_names = model.encode_prompts(["bottle", "qq7x"], embeddings)
        with_object = model.encode_prompts(["object", "object"], embeddings)
    weights = output.class_name_decision.class_weights
    assert ((weights >= 0) & (weights <= 1)).all()
    torch.testing.assert_close(weights, output.class_name_decision.probabilities)
    assert output.class_name_decision.names_used == ["bottle", "qq7x"]
    torch.testing.assert_close(soft[0], F.normalize(0.25 * with_names[0] + 0.75 * with_object[0], dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft[1], with_names[1], atol=1e-5, rtol=0)


# ----- dual branch, output, loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("branch_weight", [0.0, 0.3, 1.0])
def test_branch_fusion_arithmetic(make_model, pixels, branch_weight):
    model = make_model(branch_weight=branch_weight)
    randomise_mvp(model)
    with torch.no_grad():
        output = model(pixels, class_names=["bottle", "cable"])
    fused = branch_weight * output.vision_map + (1 - branch_weight) * output.query_map
    torch.testing.assert_close(output.anomaly_map, fused.clamp(0, 1), rtol=0, atol=1e-6)
    global_score = branch_weight * output.vision_global_score + (1 - branch_weight) * output.query_global_score
    torch.testing.assert_close(output.global_score, global_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.map_score, output.anomaly_map.flatten(1).amax(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(output.image_score, (global_score + output.map_score) / 2, rtol=0, atol=1e-6)
    assert output.layer_maps.shape == (2, 4, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert output.anomaly_map.shape == (2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)


def test_text_cache_hits_on_the_second_call(fresh_backbone, pixels, monkeypatch):
    model = tiny_model("genclip", fresh_backbone)
    calls = []
    encode_text = fresh_backbone.encode_text
    monkeypatch.setattr(fresh_backbone, "encode_text", lambda ids, *a, **k: calls.append(ids.shape[0]) or encode_text(ids, *a, **k))
    layers = len(model.config.feature_layers)
    with torch.no_grad():
        first = model(pixels, class_names="bottle")
        assert len(calls) == 4  # CNF generic nouns, CNF name, query-only branch, vision-enhanced branch
        calls.clear()
        second = model(pixels, class_names="bottle")
        assert calls == [2 * layers * 2]  # only the image-dependent prompts: B x L x 2 in one call
        calls.clear()
        model(pixels, class_names="cable")
        assert len(calls) == 2  # the new name's CNF prompt, then the vision-enhanced branch
        calls.clear()
        model(pixels, class_names=["cable", "bottle"])
        assert len(calls) == 1  # a batch mixing known names reuses their CNF features
    torch.testing.assert_close(second.anomaly_map, first.anomaly_map, rtol=0, atol=0)


@pytest.fixture
def targets():
    masks = torch.zeros(2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    masks[0, 30:60, 40:80] = 1
    return {"masks": masks, "labels": torch.tensor([1, 0])}


def test_training_loss_reaches_every_adapter_through_the_vision_branch_alone(make_model, pixels, targets):
    model = make_model().train()  # default: the paper's training, query-only branch (F_Q) left out
    loss = model(pixels, class_names=["bottle", "bottle"], **targets).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if not name.startswith("clip."):  # N_p, A_p, Q_p learn through the vision-enhanced branch
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.filter_class_names(["pcb1"], torch.zeros(1, 1)).mode == "off"  # no CNF while training
    both = make_model(train_query_branch=True).train()
    with torch.no_grad():
        both_loss = both(pixels, class_names=["bottle", "bottle"], **targets).loss
    assert both_loss > loss + 0.1  # the query-only branch's four layer losses are added


@pytest.mark.parametrize("branch", ["vision", "fused"])
def test_image_loss_weight_scales_the_cross_entropy_of_the_chosen_branchs_global_probabilities(make_model, pixels, targets, branch):
    losses = {}
    for weight in (0.0, 1.0, 2.5):
        with torch.no_grad():
            output = make_model(image_loss_weight=weight, image_loss_branch=branch).train()(
                pixels, class_names=["bottle", "bottle"], **targets)
        losses[weight] = output.loss
    # vision: the vision-enhanced branch's probability; fused: b * vision + (1 - b) * query. Labels (1, 0).
    abnormal = (output.vision_global_score if branch == "vision" else output.global_score).double()
    cross_entropy = (-(abnormal[0].log() + (1.0 - abnormal[1]).log()) / 2).float()
    assert cross_entropy > 0.01
    torch.testing.assert_close(losses[1.0], losses[0.0] + cross_entropy)
    torch.testing.assert_close(losses[2.5], losses[0.0] + 2.5 * cross_entropy)


def query_features_gradient(model, pixels, targets):
    """The gradient the training loss sends to the query-only branch's text features F_Q (None: none reaches them)."""
    captured = []
    compute = model.query_text_features

    def kept():
        features = compute()
        features.retain_grad()
        captured.append(features)
        return features

    model.query_text_features = kept
    model(pixels, class_names=["bottle", "bottle"], **targets).loss.backward()
    return captured[0].grad


def test_f_q_gets_no_gradient_by_default_and_does_with_the_fused_image_loss(make_model, pixels, targets):
    assert GenCLIPConfig().image_loss_branch == "vision"
    assert query_features_gradient(make_model().train(), pixels, targets) is None
    fused = query_features_gradient(make_model(image_loss_branch="fused").train(), pixels, targets)
    assert fused is not None and fused.abs().sum() > 0
    with pytest.raises(ZSADError, match="image_loss_branch"):
        GenCLIPConfig(image_loss_branch="query")

