"""zsad evaluate records which model it evaluated; publish takes those results only for the very same weights."""

import json

import torch

import zsad
from zsad.runtime.provenance import adapter_digest, checkpoint_digest, model_digest
from zsad_cli import main

HUB_BACKBONE = "zsad-tests/tiny-random-clip"  # published with --tiny-backbone-for-tests


def test_the_digest_covers_names_shapes_and_values():
    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    assert adapter_digest(weights) == adapter_digest(dict(reversed(weights.items())))  # order of the names does not count
    changed = [{**weights, "a": weights["a"] + 1e-6}, {**weights, "a": weights["a"].reshape(3, 2)},
               {"c": weights["a"], "b": weights["b"]}, {**weights, "b": weights["b"].double()}]
    assert len({adapter_digest(weights), *map(adapter_digest, changed)}) == 5


def test_evaluate_records_the_checkpoint_and_publish_takes_its_results_for_those_weights_only(
        tiny_clip_path, tiny_backbone, synthetic_root, tmp_path, monkeypatch, capsys):
    model = zsad.GenCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=56, base_model_hub_id=HUB_BACKBONE)
    model.adapter_parameters()[0].data.add_(0.05)
    model.config.is_trained = True
    model.config.training_dataset, model.config.training_categories = "mvtec", ["wood"]
    model.save_pretrained(tmp_path / "checkpoint")
    assert checkpoint_digest(tmp_path / "checkpoint") == model_digest(model)
    root = synthetic_root(["tile"], num_defective=2)

    monkeypatch.chdir(tmp_path)  # the checkpoint given by a relative path
    assert main(["evaluate", "--model", "checkpoint", "--dataset", "mvtec", "--root", str(root), "--out", "results",
                 "--shots", "1", "--seeds", "1"]) == 0
    report = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert report["few_shot"]["shots"] == 1 and report["few_shot"]["seeds"] == [0]  # the zero-shot and the 1-shot runs
    evaluated = report["evaluated_model"]
    assert evaluated == {"name_or_path": str(tmp_path / "checkpoint"), "model_type": "genclip", "status": "trained",
                         "training_dataset": "mvtec", "training_categories": ["wood"], "adapter_digest": model_digest(model)}

    # Unseen categories (tile) of the training dataset: the results go on the card, as synthetic data (synthetic_root).
    assert main(["publish", "checkpoint", "--repo-id", "org/genclip", "--eval", "results/evaluation.json", "--dry-run", "upload",
                 "--tiny-backbone-for-tests"]) == 0
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "### mvtec (synthetic images in its layout, not the benchmark)" in card and "(test split)" not in card

    model.adapter_parameters()[0].data.add_(0.05)  # trained further and saved over: these results are not of it
    model.save_pretrained(tmp_path / "checkpoint")
    capsys.readouterr()
    assert main(["publish", "checkpoint", "--repo-id", "org/genclip", "--eval", "results/evaluation.json", "--dry-run", "again",
                 "--tiny-backbone-for-tests"]) == 2
    assert f"is of another model: {tmp_path / 'checkpoint'} with weights sha256:" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
