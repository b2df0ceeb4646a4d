"""train/train.py pieces that need no dataset: command-line settings, mask loading for training (in process)."""

import pytest
from PIL import Image

from train import train as train_script  # train/ is a script folder; the repository root is on sys.path
from zsad import StackCLIPModel, ZSADError


def _parse(*extra, method="stackclip"):
    return train_script.parse_args(
        ["--method", method, "--train-dataset", "mvtec", "--train-root", "r", "--output-dir", "o", *extra]
    )


def test_method_switches_and_settings_become_config_overrides():
    args = _parse("--all-data", "--set", "fusion_weight=0.7", "--set", "ctx_init=a photo of the", "--image-size", "112")
    overrides = train_script.config_overrides(args, StackCLIPModel.config_class)
    assert overrides == {"efa_training": "all-data", "fusion_weight": 0.7, "ctx_init": "a photo of the", "image_size": 112}
    assert _parse().epochs == 5 and _parse().batch_size == 8 and _parse().seed == 111 and _parse().lr == 1e-3


def test_anomalyclip_trains_by_the_authors_recipe_unless_told_otherwise():
    from zsad.modeling.configuration_anomalyclip import AnomalyCLIPConfig

    args = _parse(method="anomalyclip")
    assert (args.epochs, args.batch_size, args.lr, args.betas) == (15, 8, 1e-3, (0.5, 0.999))
    config = AnomalyCLIPConfig(**train_script.config_overrides(args, AnomalyCLIPConfig))
    assert (config.image_size, config.feature_layers, config.map_loss_weight) == (518, [24], 4.0)
    assert _parse("--epochs", "2", "--lr", "0.01", method="anomalyclip").epochs == 2
    assert _parse("--epochs", "2", "--lr", "0.01", method="anomalyclip").lr == 0.01


def test_unknown_settings_are_refused():
    with pytest.raises(ZSADError, match="no setting"):
        train_script.config_overrides(_parse("--set", "fusion_wieght=0.7"), StackCLIPModel.config_class)
    with pytest.raises(ZSADError, match="KEY=VALUE"):
        train_script.config_overrides(_parse("--set", "fusion_weight"), StackCLIPModel.config_class)


def test_masks_are_resized_with_nearest_neighbour_and_binarised(tmp_path):
    from zsad.data import Sample
    from zsad.data.model_input import load_mask

    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(1, (0, 0, 4, 8))  # VisA-style label values count as defect pixels
    mask.save(tmp_path / "mask.png")
    defective = Sample(tmp_path / "image.png", tmp_path / "mask.png", 1, "pcb", "bad")
    assert load_mask(defective, 4).tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4
    normal = Sample(tmp_path / "image.png", None, 0, "pcb", "good")
    assert load_mask(normal, 3).tolist() == [[0.0] * 3] * 3


def test_backbone_precision_applies_to_the_vision_transformer_only(tiny_clip_path):
    import torch

    args = _parse("--clip", str(tiny_clip_path), "--backbone-precision", "bfloat16", "--image-size", "56")
    model = train_script.build_model(args, resume_dir=None)
    assert model.clip.dtype is torch.bfloat16
    assert model.clip.model.text_model.embeddings.token_embedding.weight.dtype is torch.float32
    assert all(p.dtype is torch.float32 for p in model.adapter_parameters())
    pixels = torch.randn(2, 3, 56, 56)
    loss = model.train()(pixels, ["wood", "tile"], masks=torch.zeros(2, 56, 56), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters())
    assert _parse().backbone_precision == "float32"
