"""`train/train.py --method genclip` on a tiny CLIP and synthetic data: the loss falls, the checkpoint
reloads identically and loads with remote code in a process without zsad."""

import sys

import pytest
import torch

from zsad import GenCLIPModel

from conftest import whole_dataset_batch
from remote_code import run_without_zsad
from train_script import TRAIN_SCRIPT, run_command, training_arguments

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_path, training_root):
    output_dir = tmp_path_factory.mktemp("genclip-run")
    run_command([sys.executable, str(TRAIN_SCRIPT), *training_arguments("genclip", tiny_clip_path, training_root, output_dir, 2, IMAGE_SIZE, 4)])
    return output_dir


@pytest.fixture(scope="module")
def training_batch(training_root, tiny_backbone):
    """The whole training set as one batch, preprocessed as train.py does."""
    return whole_dataset_batch(training_root, IMAGE_SIZE, tiny_backbone)


def _training_loss(model, batch) -> float:
    model.train()
    with torch.no_grad():
        loss = model(batch["pixel_values"], batch["class_names"], masks=batch["masks"], labels=batch["labels"]).loss.item()
    model.eval()
    return loss


def test_training_lowers_the_loss_and_uses_adamw(run_dir, tiny_clip_path, tiny_backbone, training_batch):
    rows = (run_dir / "loss.csv").read_text().splitlines()[1:]
    epoch_means = [sum(float(r.split(",")[3]) for r in rows if r.startswith(f"{e},")) for e in (1, 2)]
    assert epoch_means[1] < epoch_means[0]
    trained = GenCLIPModel.from_pretrained(run_dir / "epoch-2", clip_model=tiny_backbone)
    untrained = GenCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    assert trained.config.is_trained and not untrained.config.is_trained
    assert _training_loss(trained, training_batch) < _training_loss(untrained, training_batch) - 1.0
    assert any(linear.weight.abs().sum() > 0 for linear in trained.vision_prompts)  # MVPs left zero
    state = torch.load(run_dir / "epoch-2" / "training_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(0.01)  # AdamW's default


def test_checkpoint_reloads_identically_and_with_remote_code_without_zsad(run_dir, tiny_backbone, tmp_path):
    checkpoint = run_dir / "epoch-2"
    model = GenCLIPModel.from_pretrained(checkpoint, clip_model=tiny_backbone)
    again = GenCLIPModel.from_pretrained(checkpoint)  # loads the backbone named in the config
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixels, class_names=["tile", "capsule"])
        torch.testing.assert_close(again(pixels, class_names=["tile", "capsule"]).anomaly_map, expected.anomaly_map,
                                   rtol=0, atol=0)
    assert run_without_zsad(checkpoint, pixels, ["tile", "capsule"], expected, tmp_path)["class"] == "GenCLIPModel"
