"""train/train.py end to end on a tiny CLIP and a synthetic MVTec-layout dataset: checkpoints, logs, loss,
resume, remote-code loading, and a 2-process Accelerate run (gloo on CPU)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train import train as train_script  # train/ is a script folder; the repository root is on sys.path
from zsad import StackCLIPModel
from zsad.data import load_dataset

from conftest import TRAINING_CATEGORIES, whole_dataset_batch
from remote_code import run_without_zsad
from train_script import LOOPBACK_ENV, REPO, TRAIN_SCRIPT, run_command, training_arguments

IMAGE_SIZE = 56
BATCH_SIZE = 4



def _training_args(clip, root, output_dir, epochs, *extra):
    return training_arguments("stackclip", clip, root, output_dir, epochs, IMAGE_SIZE, BATCH_SIZE, *extra)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, tiny_clip_path, training_root):
    """Two epochs with --clip given relative to the working directory of the run (the repository root)."""
    output_dir = tmp_path_factory.mktemp("run")
    relative_clip = os.path.relpath(tiny_clip_path, REPO)
    run_command([sys.executable, str(TRAIN_SCRIPT), *_training_args(relative_clip, training_root, output_dir, 2)])
    return output_dir


def test_a_relative_clip_is_stored_absolute_and_the_checkpoint_loads_from_another_directory(two_epoch_run, tiny_clip_path,
                                                                                            tiny_backbone, tmp_path, monkeypatch):
    from transformers import AutoModel

    checkpoint = two_epoch_run / "epoch-2"
    monkeypatch.chdir(tmp_path)  # the relative path given to train.py names nothing from here
    loaded = AutoModel.from_pretrained(checkpoint)  # the backbone named in its config, no clip_model
    assert loaded.config.base_model_name_or_path == str(tiny_clip_path.resolve())
    shared = StackCLIPModel.from_pretrained(checkpoint, clip_model=tiny_backbone)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, class_names="plate").anomaly_map, shared(pixels, class_names="plate").anomaly_map)


def test_the_checkpoint_records_what_it_was_trained_on_and_its_card_says_so(two_epoch_run, training_root):
    import zsad
    from zsad.hub.publish import render_model_card

    config = json.loads((two_epoch_run / "epoch-2" / "config.json").read_text())
    assert {key: config[key] for key in config if key.startswith("training_")} == {
        "training_dataset": "mvtec", "training_categories": sorted(TRAINING_CATEGORIES), "training_epochs": 2,
        "training_image_size": IMAGE_SIZE, "training_batch_size": BATCH_SIZE, "training_learning_rate": 1e-3,
        "training_seed": 111, "training_zsad_version": zsad.__version__,
    }
    assert json.loads((two_epoch_run / "epoch-1" / "config.json").read_text())["training_epochs"] == 1
    card = str(render_model_card(zsad.StackCLIPConfig.from_pretrained(two_epoch_run / "epoch-2")))
    assert "**Status: trained** on the auxiliary dataset **mvtec**" in card
    assert "- Training dataset: **mvtec** (categories: capsule, wood)" in card
    assert "| `training_seed` | `111` | Seed of the run. |" in card and "| `training_epochs` | `2` | Epochs trained. |" in card


def _mean_training_loss(model, root) -> float:
    """Loss over the whole training set, in training mode (cluster routing), without updates."""
    batch = whole_dataset_batch(root, IMAGE_SIZE, model.require_backbone())
    model.train()
    with torch.no_grad():
        return model(batch["pixel_values"], batch["class_names"], masks=batch["masks"], labels=batch["labels"]).loss.item()


def test_training_writes_checkpoints_and_logs_and_lowers_the_loss(two_epoch_run, tiny_clip_path, tiny_backbone, training_root):
    num_images = len(load_dataset("mvtec", training_root))
    steps_per_epoch = math.ceil(num_images / BATCH_SIZE)
    for epoch in (1, 2):
        folder = two_epoch_run / f"epoch-{epoch}"
        assert (folder / "model.safetensors").is_file() and (folder / "training_state.pt").is_file()
        state = torch.load(folder / "training_state.pt", weights_only=False)
        assert state["epoch"] == epoch and state["global_step"] == epoch * steps_per_epoch
    rows = (two_epoch_run / "loss.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,global_step,loss" and len(rows) == 1 + 2 * steps_per_epoch
    assert all(math.isfinite(float(row.split(",")[3])) for row in rows[1:])
    with Image.open(two_epoch_run / "loss.png") as curve:
        assert curve.format == "PNG" and curve.size[0] > 300

    trained = StackCLIPModel.from_pretrained(two_epoch_run / "epoch-2", clip_model=tiny_backbone)
    assert trained.config.is_trained and sorted(sum(trained.config.cluster_members, [])) == sorted(TRAINING_CATEGORIES)
    untrained = StackCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    untrained.prepare_for_training(TRAINING_CATEGORIES)
    assert _mean_training_loss(trained, training_root) < _mean_training_loss(untrained, training_root)


def test_resume_from_epoch_one_gives_the_same_weights_as_an_uninterrupted_run(two_epoch_run, tiny_clip_path, training_root, tmp_path):
    shutil.copytree(two_epoch_run / "epoch-1", tmp_path / "epoch-1")
    lines = (two_epoch_run / "loss.csv").read_text().splitlines()
    # A run that crashed in epoch 2 left some of its rows behind; resuming must drop them.
    (tmp_path / "loss.csv").write_text("\n".join(lines[:-1]) + "\n")
    run_command([sys.executable, str(TRAIN_SCRIPT), *_training_args(tiny_clip_path, training_root, tmp_path, 2, "--resume")])
    resumed = load_file(tmp_path / "epoch-2" / "model.safetensors")
    uninterrupted = load_file(two_epoch_run / "epoch-2" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    assert (tmp_path / "loss.csv").read_text().splitlines() == lines


def test_checkpoint_loads_with_remote_code_in_a_process_without_zsad(two_epoch_run, tiny_backbone, tmp_path):
    checkpoint = two_epoch_run / "epoch-2"
    model = StackCLIPModel.from_pretrained(checkpoint, clip_model=tiny_backbone)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixels, class_names="plate")
    assert run_without_zsad(checkpoint, pixels, "plate", expected, tmp_path)["class"] == "StackCLIPModel"


def test_two_process_accelerate_run_saves_the_weights_both_processes_hold(two_process_launcher, tiny_clip_path, tiny_backbone,
                                                                          training_root, tmp_path):
    run_command([*two_process_launcher(), str(TRAIN_SCRIPT), *_training_args(tiny_clip_path, training_root, tmp_path, 1)],
                extra_env=LOOPBACK_ENV)
    state = torch.load(tmp_path / "epoch-1" / "training_state.pt", weights_only=False)
    checksums = state["parameter_checksums"]
    assert checksums.shape[0] == 2 and torch.equal(checksums[0], checksums[1])
    saved = StackCLIPModel.from_pretrained(tmp_path / "epoch-1", clip_model=tiny_backbone)
    torch.testing.assert_close(train_script.parameter_checksums(saved), checksums[0], rtol=0, atol=0)
    untrained = StackCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=IMAGE_SIZE)
    assert not torch.equal(train_script.parameter_checksums(untrained), checksums[0])
    # Each step takes BATCH_SIZE images on each of the two processes.
    num_images = len(load_dataset("mvtec", training_root))
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + math.ceil(num_images / (2 * BATCH_SIZE))


def test_resume_skips_an_epoch_whose_state_a_kill_left_empty_and_says_so(two_epoch_run, tiny_clip_path, training_root, tmp_path):
    for epoch in (1, 2):
        shutil.copytree(two_epoch_run / f"epoch-{epoch}", tmp_path / f"epoch-{epoch}")
    (tmp_path / "epoch-2" / train_script.STATE_FILE).write_bytes(b"")  # what a kill during torch.save left before
    completed = run_command([sys.executable, str(TRAIN_SCRIPT), *_training_args(tiny_clip_path, training_root, tmp_path, 2, "--resume")])
    assert "epoch-2 is incomplete (training_state.pt unreadable: EOFError); resuming from the epoch before it." in completed.stderr
    resumed, uninterrupted = load_file(tmp_path / "epoch-2" / "model.safetensors"), load_file(two_epoch_run / "epoch-2" / "model.safetensors")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_resume_with_other_hyperparameters_is_refused_unless_forced_and_then_recorded(two_epoch_run, tiny_clip_path, training_root,
                                                                                      tmp_path):
    shutil.copytree(two_epoch_run / "epoch-1", tmp_path / "epoch-1")
    command = [sys.executable, str(TRAIN_SCRIPT), *_training_args(tiny_clip_path, training_root, tmp_path, 2, "--resume", "--lr", "0.01",
                                                                  "--seed", "5")]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--lr 0.001 then, 0.01 now" in refused.stderr and "--seed 111 then, 5 now" in refused.stderr and "--force" in refused.stderr
    assert not (tmp_path / "epoch-2").exists()
    run_command([*command, "--force"])
    config = json.loads((tmp_path / "epoch-2" / "config.json").read_text())
    assert config["training_changes"] == [{"after_epoch": 1, "lr": [0.001, 0.01], "seed": [111, 5]}]
    assert config["training_learning_rate"] == 0.01


def test_training_the_training_free_baseline_is_refused_clearly(tiny_clip_path, training_root, tmp_path, capsys):
    arguments = training_arguments("baseline", tiny_clip_path, training_root, tmp_path, 1, IMAGE_SIZE, BATCH_SIZE)
    assert train_script.main(arguments) == 2
    assert "'baseline' is training-free: it has no weights to train" in capsys.readouterr().err
