"""How a model names its backbone: a local copy stored absolute, its Hub id recorded where it is known and used when
the copy is absent; the same for product profiles; and what a missing backbone says offline."""

import json
import shutil

import pytest
import torch

import zsad
from zsad import AnomalyDetector
from zsad.detection.profile import ProductProfile
from zsad.detection.references import FusionScale, ReferenceMemory
from zsad.runtime.errors import BackboneLoadError

HUB_ID = "openai/clip-vit-base-patch32"
COMMIT = "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268"


def copy_of(tiny_clip_path, folder):
    shutil.copytree(tiny_clip_path, folder)
    return folder


def test_a_relative_path_is_stored_absolute(tiny_clip_path, tiny_backbone, monkeypatch):
    monkeypatch.chdir(tiny_clip_path.parent)
    model = zsad.ZeroShotCLIPModel.from_clip(tiny_clip_path.name, clip_model=tiny_backbone)
    assert model.config.base_model_name_or_path == str(tiny_clip_path.resolve())
    assert model.config.base_model_hub_id is None and model.config.backbone_hub_id is None


def test_a_hub_cache_snapshot_gives_the_hub_id_and_commit(tiny_clip_path, tiny_backbone, tmp_path):
    snapshot = copy_of(tiny_clip_path, tmp_path / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots" / COMMIT)
    config = zsad.ZeroShotCLIPModel.from_clip(str(snapshot), clip_model=tiny_backbone).config
    assert (config.base_model_name_or_path, config.base_model_hub_id, config.base_model_revision) == (str(snapshot), HUB_ID, COMMIT)
    assert config.backbone_source() == (str(snapshot), COMMIT)  # the copy while it is there
    shutil.rmtree(snapshot)
    assert config.backbone_source() == (HUB_ID, COMMIT)  # elsewhere, the Hub


def test_a_copy_whose_config_names_its_origin_records_that_hub_id(tiny_clip_path, tiny_backbone, tmp_path):
    copy = copy_of(tiny_clip_path, tmp_path / "clip")
    saved = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**saved, "_name_or_path": HUB_ID}))
    assert zsad.ZeroShotCLIPModel.from_clip(str(copy), clip_model=tiny_backbone).config.base_model_hub_id == HUB_ID
    named = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, base_model_hub_id="org/clip")
    assert named.config.backbone_hub_id == "org/clip"


def test_a_hub_id_is_kept_as_given(tiny_backbone):
    config = zsad.ZeroShotCLIPModel.from_clip(HUB_ID, clip_model=tiny_backbone, revision="main").config
    assert (config.base_model_name_or_path, config.base_model_revision, config.backbone_hub_id) == (HUB_ID, "main", HUB_ID)
    assert config.backbone_source() == (HUB_ID, "main")


def profile_on(backbone: str, hub_id: str | None, config) -> ProductProfile:
    memory = ReferenceMemory(list(config.feature_layers), [torch.zeros(1, 64, 24) for _ in config.feature_layers], 8, 112,
                             config.vv_attention_from)
    return ProductProfile("baseline", "disk", memory, None, backbone, None, FusionScale(1.0), backbone_hub_id=hub_id)


def test_a_profile_records_the_hub_id_and_fits_another_copy_of_the_same_backbone(tiny_clip_path, tiny_backbone, tmp_path):
    here = zsad.ZeroShotCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=112,
                                            base_model_hub_id=HUB_ID)
    elsewhere = zsad.ZeroShotCLIPModel.from_clip("/other/machine/clip", clip_model=tiny_backbone, image_size=112,
                                                 base_model_hub_id=HUB_ID)
    profile = profile_on(here.config.base_model_name_or_path, here.config.backbone_hub_id, here.config)
    loaded = ProductProfile.load(profile.save(tmp_path / "profile"))
    assert json.loads((tmp_path / "profile" / "profile.json").read_text())["backbone_hub_id"] == HUB_ID
    loaded.check_compatible("baseline", "disk", elsewhere.config)

    other = zsad.ZeroShotCLIPModel.from_clip("/other/machine/clip", clip_model=tiny_backbone, image_size=112,
                                             base_model_hub_id="org/another-clip")
    with pytest.raises(zsad.ZSADError, match="built on the backbone"):
        loaded.check_compatible("baseline", "disk", other.config)
    local_only = profile_on(str(tiny_clip_path), None, here.config)
    with pytest.raises(zsad.ZSADError, match="built on the backbone"):
        local_only.check_compatible("baseline", "disk", elsewhere.config)


def test_a_missing_backbone_says_how_to_go_on_offline(tmp_path, tiny_clip_path, tiny_backbone):
    with pytest.raises(BackboneLoadError) as caught:
        AnomalyDetector.for_model("baseline", clip=str(tmp_path / "no-clip"))
    for advice in ("--clip PATH", "ZSAD_CLIP=PATH", "zsad tiny-clip tiny-clip"):
        assert advice in str(caught.value)

    moved = zsad.ZeroShotCLIPModel.from_clip(str(tmp_path / "gone"), clip_model=tiny_backbone)
    moved.save_pretrained(tmp_path / "checkpoint")
    with pytest.raises(BackboneLoadError, match="zsad tiny-clip") as caught:
        zsad.load_model(str(tmp_path / "checkpoint"))
    assert caught.value.clip == str(tmp_path / "gone")
    with pytest.raises(zsad.ZSADError, match="holds a 'clip' model"):
        zsad.load_model(str(tiny_clip_path))


def test_a_profile_built_on_a_relative_clip_names_it_absolute(tiny_clip_path, tmp_path, monkeypatch):
    from PIL import Image

    for index, colour in enumerate(["grey", "silver"]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"good{index}.png")
    monkeypatch.chdir(tiny_clip_path.parent)
    detector = AnomalyDetector.for_model("baseline", clip=tiny_clip_path.name, image_size=112)
    profile = detector.build_profile("baseline", "disk", [str(tmp_path / "good0.png"), str(tmp_path / "good1.png")])
    saved = json.loads((profile.save(tmp_path / "profile") / "profile.json").read_text())
    assert saved["backbone"] == str(tiny_clip_path.resolve()) and saved["backbone_hub_id"] is None
