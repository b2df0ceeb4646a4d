"""The base class every method builds on (adapter-only saving, one Hub commit, loading errors, the frozen backbone)
and the training-free baseline's own behaviour; the checks every model passes are in test_models_common.py."""

import json

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

import zsad
from zsad import ZeroShotCLIPModel, ZSADError
from zsad.modeling.configuration_zsad_base import ZSADBaseConfig
from zsad.modeling.modeling_zsad_base import ZSADPreTrainedModel

from conftest import TEST_IMAGE_SIZE, tiny_model


class ToyAdapterConfig(ZSADBaseConfig):
    model_type = "zsad_toy_adapter"


class ToyAdapterModel(ZSADPreTrainedModel):
    """A base-class user with one trainable head, to check adapter-only saving."""

    config_class = ToyAdapterConfig

    def __init__(self, config):
        super().__init__(config)
        self.head = torch.nn.Linear(config.vision_hidden_size, config.projection_dim)
        self.post_init()

    def init_from_backbone(self):
        self.head.weight.data.copy_(self.clip.model.visual_projection.weight)
        self.head.bias.data.zero_()

    def forward(self, pixel_values):
        return self.head(self.encode_image(pixel_values).patch_tokens(0))


@pytest.fixture
def baseline(tiny_backbone):
    return tiny_model("baseline", tiny_backbone)


def test_config_defaults_follow_the_backbone(baseline):
    assert baseline.config.feature_layers == [1, 2, 3, 4]
    assert ZSADBaseConfig().feature_layers == [6, 12, 18, 24]
    assert ZSADBaseConfig().image_size == 518


def test_adapter_only_save_and_identical_reload(tmp_path, tiny_clip_path, tiny_backbone, pixels):
    model = ToyAdapterModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=TEST_IMAGE_SIZE)
    with torch.no_grad():
        model.head.weight.add_(0.1)
        expected = model(pixels)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert set(weights) == {"head.weight", "head.bias"}
    assert (tmp_path / "model.safetensors").stat().st_size < 20_000
    reloaded = ToyAdapterModel.from_pretrained(tmp_path)  # loads the backbone named in the config
    assert reloaded.clip is not tiny_backbone
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), expected, rtol=0, atol=0)
    assert not reloaded.clip.training and not any(p.requires_grad for p in reloaded.clip.parameters())
    assert reloaded.head.weight.requires_grad


def test_push_to_hub_makes_one_commit_with_our_card(monkeypatch, baseline):
    commits = []

    def fake_create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: op.path_or_fileobj for op in operations}
        contents = {path: (open(src, "rb").read() if isinstance(src, str) else src) for path, src in files.items()}
        commits.append({"repo_id": repo_id, "files": contents, **kwargs})
        return "fake-commit"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    baseline.push_to_hub("org/tiny-baseline", commit_description="why", revision="dev", create_pr=True)
    assert len(commits) == 1
    files = commits[0]["files"]
    assert commits[0]["repo_id"] == "org/tiny-baseline"
    assert (commits[0]["commit_description"], commits[0]["revision"], commits[0]["create_pr"]) == ("why", "dev", True)
    for name in ["model.safetensors", "config.json", "README.md", "modeling_zeroshot_clip.py",
                 "configuration_zeroshot_clip.py", "modeling_zsad_base.py", "clip_backbone.py", "lru_cache.py", "prefix_tree.py"]:
        assert name in files, sorted(files)
    card = files["README.md"].decode() if isinstance(files["README.md"], bytes) else files["README.md"].read().decode()
    assert "ZeroShotCLIPModel for zero-shot anomaly detection" in card
    assert "untrained" in card and "trust_remote_code=True" in card
    assert "automatically generated" not in card
    with pytest.raises(TypeError, match="safe_serialisation"):  # a misspelt argument is not silently dropped
        baseline.push_to_hub("org/tiny-baseline", safe_serialisation=True)
    assert len(commits) == 1


def test_truncated_weights_raise_clear_error(tmp_path, tiny_clip_path, tiny_backbone):
    model = ToyAdapterModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ZSADError, match="Could not load the zsad checkpoint"):
        ToyAdapterModel.from_pretrained(tmp_path, clip_model=tiny_backbone)


def test_missing_checkpoint_folder_raises(tmp_path):
    with pytest.raises(ZSADError, match="Could not load the zsad checkpoint"):
        ZeroShotCLIPModel.from_pretrained(tmp_path / "nowhere")


def test_unknown_backbone_raises_clear_error(tmp_path, baseline):
    baseline.config.base_model_name_or_path = "no-such-org/no-such-clip"
    baseline.save_pretrained(tmp_path)
    with pytest.raises(ZSADError, match="Could not load the CLIP backbone 'no-such-org/no-such-clip'"):
        ZeroShotCLIPModel.from_pretrained(tmp_path)


def test_backbone_of_other_size_is_refused(tmp_path, tiny_clip_path, tiny_backbone):
    config_path = tmp_path / "other"
    model = ToyAdapterModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone)
    model.config.vision_hidden_size = 1024
    with pytest.raises(ZSADError, match="backbone it was trained on"):
        model.attach_backbone(tiny_backbone)
    assert not config_path.exists()


def test_training_mode_never_reaches_the_backbone(baseline):
    baseline.train()
    assert baseline.training and not baseline.clip.training
    assert not any(p.requires_grad for p in baseline.clip.parameters())


def test_model_without_backbone_says_how_to_attach():
    model = ZeroShotCLIPModel(zsad.ZeroShotCLIPConfig())
    with pytest.raises(ZSADError, match="from_clip"):
        model(torch.randn(1, 3, 56, 56), class_names="bottle")


def test_class_text_features_are_computed_once(monkeypatch, fresh_backbone, pixels):
    baseline = tiny_model("baseline", fresh_backbone)
    encoded_rows = []  # prompts per prompt-encoding call
    original = baseline.clip.encode_prompts
    monkeypatch.setattr(baseline.clip, "encode_prompts", lambda texts, *a: encoded_rows.append(len(texts)) or original(texts, *a))
    with torch.no_grad():
        first = baseline(pixels, class_names=["bottle", "bottle"])
        prompts_per_name = sum(encoded_rows)
        assert prompts_per_name > 0
        second = baseline(pixels, class_names="bottle")
        assert sum(encoded_rows) == prompts_per_name
        baseline(pixels[:1], class_names="cable")
        assert sum(encoded_rows) == 2 * prompts_per_name
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map, rtol=0, atol=0)



def test_vv_attention_from_defaults_to_the_lineage_is_saved_and_can_be_set_at_load_time(tiny_clip_path, tiny_backbone, tmp_path):
    model = ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=TEST_IMAGE_SIZE)
    assert model.config.vv_attention_from == 1  # the first quarter point of the tiny CLIP's 4 blocks
    model.save_pretrained(tmp_path / "with")
    assert json.loads((tmp_path / "with" / "config.json").read_text())["vv_attention_from"] == 1
    assert zsad.load_model(str(tmp_path / "with"), backbone=tiny_backbone).config.vv_attention_from == 1
    changed = zsad.load_model(str(tmp_path / "with"), backbone=tiny_backbone, vv_attention_from=3)
    pixels = torch.randn(1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert changed.config.vv_attention_from == 3 and changed.encode_image(pixels).vv_attention_from == 3
    # A checkpoint saved before the field existed was trained on CLIP's own tokens and loads so.
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    del config["vv_attention_from"]
    (tmp_path / "with" / "config.json").write_text(json.dumps(config))
    assert zsad.load_model(str(tmp_path / "with"), backbone=tiny_backbone).config.vv_attention_from is None
    with pytest.raises(ZSADError, match="only to untrained models"):
        zsad.load_model(str(tmp_path / "with"), backbone=tiny_backbone, image_size=56)
    with pytest.raises(ZSADError, match="vv_attention_from must be a vision block in 1..4"):
        ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, vv_attention_from=5)
