"""Model cards and `zsad publish`: the card is filled from the config and the evaluation JSON, and publishing is
one Hub commit with weights, config, code and the card (fake Hub transport, no network)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from transformers import PreTrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files

import zsad
from zsad.evaluation.reports import load_evaluation
from zsad.hub.publish import publish, render_model_card, write_publish_folder
from zsad.runtime.provenance import model_record, provenance
from zsad_cli import main

# The Hub id the tests publish the tiny random CLIP under: publishing a tiny backbone needs tiny_backbone_for_tests,
# and the card then says its scores are noise.
HUB_BACKBONE = "zsad-tests/tiny-random-clip"
FOR_TESTS = {"tiny_backbone_for_tests": True}
REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "requirements.txt")  # what setuptools reads besides the packages
# Renders every method's card with zsad imported from the wheel archive alone (no checkout on the path).
RENDER_FROM_WHEEL = """
import json, sys
import zsad
from zsad.hub.publish import render_model_card
assert zsad.__file__.startswith(sys.argv[1]), zsad.__file__
print(json.dumps({method: str(render_model_card(m.config_class())) for method, m in zsad.METHODS.items()}))
"""

EVALUATION = {
    "model": "runs/genclip-mvtec",
    "dataset": "VisA",
    "split": "test",
    "categories": {
        "pcb1": {"image_auroc": 0.875, "image_ap": 0.9, "pixel_auroc": 0.95, "pixel_aupro": 0.8},
        "candle": {"image_auroc": 0.625, "image_ap": 0.7, "pixel_auroc": 0.85, "pixel_aupro": 0.6},
    },
    "mean": {"image_auroc": 0.75, "image_ap": 0.8, "pixel_auroc": 0.9, "pixel_aupro": 0.7},
}


@pytest.fixture
def fake_hub(monkeypatch):
    """Records create_repo / create_commit calls (paths and bytes) instead of talking to the Hub."""
    calls = {"repos": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append({"repo_id": repo_id, **kwargs})
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else bytes(source)
        calls["commits"].append({"repo_id": repo_id, "files": files, "message": kwargs.get("commit_message")})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/fake"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


@pytest.fixture(scope="module")
def trained_genclip(tiny_backbone):
    """A GenCLIP marked trained on MVTec-AD, on a backbone its config names by Hub id (the real case)."""
    model = zsad.GenCLIPModel.from_clip("tiny", clip_model=tiny_backbone, image_size=112)
    model.config.is_trained = True
    model.config.training_dataset = "MVTec-AD"
    model.config.base_model_name_or_path = HUB_BACKBONE
    return model


@pytest.fixture(scope="module")
def checkpoint(trained_genclip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("genclip-checkpoint")
    trained_genclip.save_pretrained(folder)
    return folder


def evaluation_of(model, name_or_path, **changes) -> dict:
    """EVALUATION as ``zsad evaluate`` writes it for ``model`` (its record of the evaluated model and its provenance)."""
    return {**EVALUATION, "evaluated_model": model_record(model, str(name_or_path)),
            "provenance": provenance(model, name_or_path=str(name_or_path)), **changes}


@pytest.fixture
def eval_json(tmp_path, trained_genclip, checkpoint):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(evaluation_of(trained_genclip, checkpoint)))
    return path


def model_index(card_text: str) -> dict[tuple[str, str], float]:
    """(dataset name, metric type) -> value from a card's model-index."""
    return {(r.dataset_name, r.metric_type): r.metric_value for r in ModelCard(card_text).data.eval_results or []}


def code_files_needed(folder: Path) -> set[str]:
    """The files the config's auto_map and custom_pipelines name plus their relative imports, as the remote-code loader
    needs them for ``AutoModel`` and ``pipeline``."""
    config = json.loads((folder / "config.json").read_text())
    references = [*config["auto_map"].values(), *(task["impl"] for task in config["custom_pipelines"].values())]
    modules = {reference.split(".")[0] for reference in references}
    needed = set()
    for module in modules:
        needed |= {f"{module}.py"} | {Path(path).name for path in get_relative_import_files(str(folder / f"{module}.py"))}
    return needed


@pytest.mark.parametrize("source", ["folder", "model"])
def test_publish_is_one_commit_with_weights_code_and_card(fake_hub, checkpoint, trained_genclip, eval_json, source):
    publish(checkpoint if source == "folder" else trained_genclip, "org/genclip-mvtec", eval_json=eval_json, **FOR_TESTS)

    assert len(fake_hub["commits"]) == 1
    commit = fake_hub["commits"][0]
    assert commit["repo_id"] == "org/genclip-mvtec"
    files = commit["files"]
    expected = {"config.json", "model.safetensors", "README.md"} | code_files_needed(checkpoint)
    assert expected <= set(files), sorted(expected - set(files))
    assert files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == HUB_BACKBONE
    assert card.data.library_name == "transformers"
    assert {"zsad", "genclip", "anomaly-detection"} <= set(card.data.tags)
    assert model_index(str(card)) == {("VisA", key): value for key, value in EVALUATION["mean"].items()}
    task_of = {r.metric_type: r.task_type for r in card.data.eval_results}
    assert task_of["pixel_aupro"] == "image-segmentation" and task_of["image_auroc"] == "image-classification"


def test_card_lists_every_config_setting_with_its_value(trained_genclip):
    card = str(render_model_card(trained_genclip))
    generic = set(PreTrainedConfig().to_dict())
    own_fields = [f.name for f in dataclasses.fields(trained_genclip.config) if f.name not in generic]
    assert len(own_fields) > 20
    for name in own_fields:
        assert f"| `{name}` |" in card, name
    assert "| `cnf_threshold` | `0.2` | CNF keeps the name when its zero-shot probability" in card
    # Every method setting carries its description as data next to the field (no docstring parsing).
    described = {f.name for f in dataclasses.fields(trained_genclip.config) if f.metadata.get("description")}
    assert set(own_fields) - described <= {name for name in own_fields if name.startswith("training_")}
    assert "| `branch_weight` | `0.5` |" in card
    assert "| `feature_layers` | `[1, 2, 3, 4]` |" in card
    assert "Training dataset: **MVTec-AD**" in card
    assert "AutoModel.from_pretrained" in card and "trust_remote_code=True" in card
    assert 'pipeline(model="ORG/NAME", trust_remote_code=True)' in card and "AnomalyDetector.for_model" in card
    assert ModelCard(card).data.pipeline_tag == "image-segmentation"
    assert ModelCard(card).data.inference is False  # the Hub's widget does not run custom code; the card says so
    assert "2504.14919" in card and "2506.23577" in card  # both papers cited


def test_stackclip_template_is_chosen_by_model_type():
    card = str(render_model_card(zsad.StackCLIPConfig()))
    assert "StackCLIP for zero-shot industrial anomaly detection" in card
    assert "| `fusion_weight` | `0.5` |" in card and "| `cluster_temperature` | `0.1` |" in card
    assert card.index("qiu2025stackclip") < card.index("kim2025genclip")


def test_stackclip_card_lists_the_clusters_and_the_count_criterion_score_of_every_candidate():
    config = zsad.StackCLIPConfig(
        cluster_members=[["pcb1", "pcb2"], ["candle", "fryum"]], stacked_names=["pcb1 pcb2", "candle fryum"],
        cluster_count_scores={"1": 2.8217, "2": 2.63906, "3": 3.6586},
    )
    card = str(render_model_card(config))
    assert "| 1 | pcb1 pcb2 | pcb1, pcb2 |" in card and "| 2 | candle fryum | candle, fryum |" in card
    assert "| 1 | 2.8217 |\n| 2 (chosen) | 2.6391 |\n| 3 | 3.6586 |" in card
    assert "per-cluster sum (k-means inertia)" in card and "| `cluster_spread` | `sum` |" in card
    forced = str(render_model_card(zsad.StackCLIPConfig(**{**config.to_dict(), "num_clusters": 2,
                                                            "cluster_count_scores": {"2": 2.63906}})))
    assert "The count was forced (`num_clusters` = 2)" in forced and "| 2 (chosen) | 2.6391 |" in forced
    assert "Not clustered yet" in str(render_model_card(zsad.StackCLIPConfig()))


@pytest.mark.parametrize(
    "overrides, says",
    [({}, ["| `train_query_branch` | `false` |", "| `image_loss_weight` | `1.0` |", "vision-enhanced branch only, as in the paper",
           "image-level cross-entropy on the fused global probabilities with weight\n  `image_loss_weight` = 1.0"]),
     ({"train_query_branch": True, "image_loss_weight": 0.0},
      ["| `train_query_branch` | `true` |", "and of the query-only branch", "No image-level loss (`image_loss_weight` = 0)"])],
)
def test_genclip_card_says_which_losses_train_it(overrides, says):
    card = str(render_model_card(zsad.GenCLIPConfig(**overrides)))
    for text in says:
        assert text in card, text


def test_untrained_card_says_so_and_has_no_results():
    config = zsad.StackCLIPConfig()
    card = render_model_card(config)
    assert "untrained (training-free start)" in str(card)
    assert not card.data.eval_results and "model-index" not in str(card)
    with pytest.raises(zsad.ZSADError, match="untrained"):
        render_model_card(config, EVALUATION)


def test_results_table_in_percent_and_means_computed_when_missing():
    report = {key: value for key, value in EVALUATION.items() if key != "mean"}
    report["categories"]["pcb1"]["pixel_ap"] = None  # not measured: left out
    (parsed,) = load_evaluation(report)
    assert parsed.mean == pytest.approx({"image_auroc": 0.75, "image_ap": 0.8, "pixel_auroc": 0.9, "pixel_aupro": 0.7})
    assert "pixel_ap" not in parsed.categories["pcb1"]
    card = str(render_model_card(zsad.ZeroShotCLIPConfig(), report))  # the baseline needs no training
    assert "| 75.0 | 80.0 | 90.0 | 70.0 |" in card
    assert "| candle | 62.5 | 70.0 | 85.0 | 60.0 |" in card


def test_an_evaluation_on_the_training_data_is_refused(fake_hub, trained_genclip, checkpoint, tmp_path):
    on_training_data = tmp_path / "mvtec.json"
    on_training_data.write_text(json.dumps(evaluation_of(trained_genclip, checkpoint, dataset="MVTec-AD")))
    with pytest.raises(zsad.ZSADError, match=r"made on the model's own training data \(MVTec-AD: candle, pcb1\)"):
        publish(checkpoint, "org/genclip-mvtec", eval_json=on_training_data, **FOR_TESTS)
    assert fake_hub["commits"] == []


def test_unseen_categories_of_the_training_dataset_are_accepted_seen_ones_refused(trained_genclip):
    config = zsad.GenCLIPConfig(**{**trained_genclip.config.to_dict(), "training_categories": ["bottle", "pcb1"]})
    config.training_dataset = "mvtec"
    unseen = {**EVALUATION, "dataset": "mvtec", "categories": {"candle": EVALUATION["categories"]["candle"]}}
    assert "| candle | 62.5 |" in str(render_model_card(config, unseen))
    with pytest.raises(zsad.ZSADError, match=r"own training data \(mvtec: pcb1\)"):
        render_model_card(config, {**EVALUATION, "dataset": "mvtec"})


def test_an_evaluation_of_the_untrained_method_or_of_another_model_is_refused(fake_hub, trained_genclip, checkpoint,
                                                                               tiny_backbone, tmp_path):
    untrained = zsad.GenCLIPModel.from_clip("tiny", clip_model=tiny_backbone, image_size=112)
    other_method = zsad.StackCLIPModel.from_clip("tiny", clip_model=tiny_backbone, image_size=112)
    retrained = zsad.GenCLIPModel.from_clip("tiny", clip_model=tiny_backbone, image_size=112)
    retrained.load_state_dict(trained_genclip.state_dict())
    retrained.adapter_parameters()[0].data.add_(0.01)  # the same model type and status, other weights
    retrained.config.is_trained = True
    refusals = {
        "untrained": (untrained, "genclip", r"is of the untrained genclip \(training-free start\)"),
        "other method": (other_method, "stackclip", r"is of a stackclip model \(stackclip\), not of this genclip model"),
        "other weights": (retrained, "runs/other", r"is of another model: runs/other with weights sha256:"),
    }
    for case, (model, name, message) in refusals.items():
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps(evaluation_of(model, name)))
        with pytest.raises(zsad.ZSADError, match=message):
            publish(checkpoint, "org/genclip-mvtec", eval_json=path, **FOR_TESTS)
        with pytest.raises(zsad.ZSADError, match=message):
            write_publish_folder(checkpoint, tmp_path / "dry-run", eval_json=path, **FOR_TESTS)
    unrecorded = tmp_path / "unrecorded.json"
    unrecorded.write_text(json.dumps(EVALUATION))
    with pytest.raises(zsad.ZSADError, match="does not say which model it evaluated"):
        publish(checkpoint, "org/genclip-mvtec", eval_json=unrecorded, **FOR_TESTS)
    assert fake_hub["commits"] == []


def test_a_backbone_known_only_as_a_local_path_is_refused_until_its_hub_id_is_named(fake_hub, tiny_backbone, tiny_clip_path,
                                                                                    tmp_path, capsys):
    local = zsad.GenCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=112)
    local.config.is_trained = True
    local.save_pretrained(tmp_path / "local")
    assert main(["publish", str(tmp_path / "local"), "--repo-id", "org/genclip"]) == 2
    error = capsys.readouterr().err
    assert f"known only as the local path {tiny_clip_path}" in error
    assert f"zsad publish {tmp_path / 'local'} --repo-id org/genclip --base-model ORG/NAME" in error
    assert fake_hub["commits"] == []

    assert main(["publish", str(tmp_path / "local"), "--repo-id", "org/genclip", "--base-model", HUB_BACKBONE,
                 "--tiny-backbone-for-tests"]) == 0
    files = fake_hub["commits"][0]["files"]
    uploaded = json.loads(files["config.json"])
    assert uploaded["base_model_hub_id"] == HUB_BACKBONE and uploaded["base_model_name_or_path"] == str(tiny_clip_path)
    assert ModelCard(files["README.md"].decode()).data.base_model == HUB_BACKBONE
    assert "Published to https://huggingface.co/org/genclip" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, message",
    [({"categories": {}}, "no dataset name"), ({"dataset": "VisA"}, "no metric values"),
     ({"dataset": "VisA", "mean": {"image_auroc": "high"}}, "must be a number")],
)
def test_malformed_evaluation_is_refused(bad, message):
    with pytest.raises(zsad.ZSADError, match=message):
        load_evaluation(bad)


def test_publish_refuses_folders_that_are_not_zsad_checkpoints(fake_hub, tmp_path, tiny_clip_path, checkpoint, capsys):
    with pytest.raises(zsad.ZSADError, match="no config.json"):
        publish(tmp_path, "org/name")
    with pytest.raises(zsad.ZSADError, match="model_type is 'clip'"):
        publish(tiny_clip_path, "org/name")
    assert main(["publish", str(tiny_clip_path), "--repo-id", "org/name"]) == 2
    assert "is not a zsad checkpoint" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "clip_backbone.py":
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(zsad.ZSADError, match="clip_backbone.py"):
        publish(broken, "org/name")
    (broken / "clip_backbone.py").write_bytes((checkpoint / "clip_backbone.py").read_bytes())
    (broken / "pipeline_zsad.py").unlink()
    with pytest.raises(zsad.ZSADError, match="lacks pipeline_zsad.py"):
        publish(broken, "org/name")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["custom_pipelines"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(zsad.ZSADError, match="names no pipeline .* saved by an older zsad"):
        publish(broken, "org/name")
    assert fake_hub["commits"] == []


def test_cli_dry_run_writes_the_upload_folder(fake_hub, checkpoint, eval_json, tmp_path, capsys):
    out = tmp_path / "upload"
    assert main(["publish", str(checkpoint), "--repo-id", "org/genclip-mvtec", "--eval", str(eval_json), "--dry-run", str(out),
                 "--tiny-backbone-for-tests"]) == 0
    assert fake_hub["commits"] == [] and fake_hub["repos"] == []
    written = {path.name for path in out.iterdir()}
    printed = capsys.readouterr().out
    assert "would create the model repo https://huggingface.co/org/genclip-mvtec" in printed
    assert f"these {len(written)} files" in printed
    for name in written:
        assert f"  {name} ({(out / name).stat().st_size:,} bytes)" in printed
    assert {"config.json", "model.safetensors", "README.md", "pipeline_zsad.py"} | code_files_needed(checkpoint) <= written
    card = (out / "README.md").read_text()
    assert model_index(card) == {("VisA", key): value for key, value in EVALUATION["mean"].items()}
    assert 'AutoModel.from_pretrained("org/genclip-mvtec", trust_remote_code=True)' in card


def test_cli_publish_prints_the_commit(fake_hub, checkpoint, capsys):
    assert main(["publish", str(checkpoint), "--repo-id", "org/genclip-mvtec", "--private",
                 "--tiny-backbone-for-tests"]) == 0
    assert fake_hub["repos"][0]["private"] is True
    assert len(fake_hub["commits"]) == 1
    assert "org/genclip-mvtec/commit/fake" in capsys.readouterr().out


def build_wheel(directory: Path) -> Path:
    """``pip wheel`` of a copy of the checkout (the build's build/ and egg-info stay out of the repo), offline."""
    source = directory / "source"
    for package in ("zsad", "zsad_cli"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(directory)]
    subprocess.run(command, check=True, timeout=120)
    (wheel,) = directory.glob("zsad-*.whl")
    return wheel


def test_installed_package_ships_and_renders_every_card_template(tmp_path):
    wheel = build_wheel(tmp_path)
    config_classes = {method: model_class.config_class for method, model_class in zsad.METHODS.items()}
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"zsad/model_cards/{name}.md" for name in ["_sections", *config_classes]} <= shipped  # one template per method id

    environment = {**os.environ, "PYTHONPATH": str(wheel)}
    completed = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_WHEEL, str(wheel)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    cards = json.loads(completed.stdout)
    assert cards == {method: str(render_model_card(config_class())) for method, config_class in config_classes.items()}


def test_space_model_cards_are_current():
    """model_cards/ holds what the packaged templates render to for the Space's default models."""
    from model_cards.render import FOLDER, space_cards

    for name, text in space_cards().items():
        assert (FOLDER / name).read_text(encoding="utf-8") == text, f"model_cards/{name} is stale: run python model_cards/render.py"


# ----- honest publishing: the backbone ------------------------------------------------------------------------------

# CLIP ViT-L/14's shape as the Hub's config of openai/clip-vit-large-patch14-336 states it.
VIT_L_CONFIG = {"model_type": "clip", "projection_dim": 768,
                "vision_config": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14,
                                  "image_size": 336},
                "text_config": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12}}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache; ``cache(repo_id, config)`` stores a config.json as a download would (offline reads)."""
    from huggingface_hub import constants

    root = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))

    def cache(repo_id: str, config: dict) -> None:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)

    return cache


def test_a_tiny_backbone_is_refused_unless_for_tests_and_then_the_card_says_noise(fake_hub, checkpoint, hub_cache, tmp_path, capsys):
    with pytest.raises(zsad.ZSADError, match="built on the tiny random CLIP .* its scores are noise, so it is not published"):
        publish(checkpoint, "org/genclip-mvtec")
    assert main(["publish", str(checkpoint), "--repo-id", "org/genclip-mvtec", "--dry-run", str(tmp_path / "refused")]) == 2
    assert "--tiny-backbone-for-tests" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert fake_hub["commits"] == []

    publish(checkpoint, "org/genclip-mvtec", **FOR_TESTS)
    card = fake_hub["commits"][0]["files"]["README.md"].decode()
    assert "**Warning: built on a tiny random CLIP, for tests of publishing only.**" in card
    assert "scores and maps are noise" in card
    assert "tiny random CLIP" not in str(render_model_card(zsad.StackCLIPConfig()))  # a real shape: no warning


def test_base_model_is_checked_against_its_hub_config(fake_hub, tiny_backbone, tiny_clip_path, hub_cache, tmp_path, capsys):
    local = zsad.GenCLIPModel.from_clip(str(tiny_clip_path), clip_model=tiny_backbone, image_size=112)
    local.config.is_trained = True
    local.save_pretrained(tmp_path / "local")
    hub_cache("openai/clip-vit-large-patch14-336", VIT_L_CONFIG)
    tiny_config = json.loads((tiny_clip_path / "config.json").read_text())
    hub_cache(HUB_BACKBONE, tiny_config)
    hub_cache("org/a-vit", {**tiny_config, "model_type": "vit"})
    command = ["publish", str(tmp_path / "local"), "--repo-id", "org/genclip", "--tiny-backbone-for-tests"]

    # The case: a checkpoint on the 4-layer, width-48 CLIP named as ViT-L/14.
    assert main([*command, "--base-model", "openai/clip-vit-large-patch14-336"]) == 2
    error = capsys.readouterr().err
    assert "built on a CLIP with vision layers 4, vision width 48, patch size 14" in error
    assert "but openai/clip-vit-large-patch14-336 on the Hub has vision layers 24, vision width 1024, patch size 14" in error
    assert main([*command, "--base-model", "org/a-vit"]) == 2
    assert "is a 'vit' model on the Hub, not a CLIP" in capsys.readouterr().err
    assert fake_hub["commits"] == []

    assert main([*command, "--base-model", HUB_BACKBONE, "--dry-run", str(tmp_path / "checked")]) == 0
    assert f"Checked: {HUB_BACKBONE} on the Hub has the backbone shape the checkpoint records" in capsys.readouterr().out
    # Offline with the id's config not in the cache: the dry run says it could not check.
    assert main([*command, "--base-model", "org/never-downloaded", "--dry-run", str(tmp_path / "unchecked")]) == 0
    printed = capsys.readouterr().out
    assert "Could not check the backbone org/never-downloaded against its config on the Hub (offline" in printed
    assert "the checkpoint records vision layers 4, vision width 48" in printed


def test_an_evaluation_made_on_another_backbone_is_refused(fake_hub, trained_genclip, checkpoint, tmp_path):
    report = evaluation_of(trained_genclip, checkpoint)
    report["provenance"]["backbone"]["shape"] |= {"vision_layers": 24, "vision_width": 1024}
    other_backbone = tmp_path / "vit-l.json"
    other_backbone.write_text(json.dumps(report))
    with pytest.raises(zsad.ZSADError, match=r"was made on another backbone .*'vision_layers': 24.* than the checkpoint's"):
        publish(checkpoint, "org/genclip-mvtec", eval_json=other_backbone, **FOR_TESTS)
    del report["provenance"]
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps(report))
    with pytest.raises(zsad.ZSADError, match="does not say which backbone made it"):
        write_publish_folder(checkpoint, tmp_path / "dry-run", eval_json=unnamed, **FOR_TESTS)
    assert fake_hub["commits"] == [] and not (tmp_path / "dry-run").exists()
