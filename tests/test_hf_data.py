"""Hugging Face datasets offline: layout -> to_hf_dataset -> save_to_disk -> samples, columns, errors, `zsad dataset push`."""

import sys

import numpy as np
import pytest

from zsad import ZSADError
from zsad.data import load_dataset, read_mask, to_hf_dataset
from zsad.data.synthetic import generate
from zsad_cli import main

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow files and written images go to the test's folder, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def layout_root(tmp_path):
    return generate(tmp_path / "data", categories=["tile", "capsule"], num_good=2, num_defective=2, image_size=40, num_train_good=0)


def test_layout_round_trip_keeps_every_file_label_and_name(layout_root, tmp_path):
    dataset = to_hf_dataset("mvtec", layout_root)
    assert dataset.column_names == ["image", "mask", "label", "category", "defect_type"]
    assert dataset.features["label"].names == ["normal", "anomalous"]
    dataset.save_to_disk(tmp_path / "saved")
    original, loaded = load_dataset("mvtec", layout_root), load_dataset(f"hf-disk:{tmp_path / 'saved'}")
    assert len(loaded) == len(original) == 8 and sum(s.label for s in loaded) == 4
    for before, after in zip(original, loaded):
        assert (after.label, after.category, after.defect_type) == (before.label, before.category, before.defect_type)
        assert after.image_path.read_bytes() == before.image_path.read_bytes()  # the files' own bytes, not re-encoded
        assert (after.mask_path is None) == (before.mask_path is None)
        assert np.array_equal(read_mask(after), read_mask(before))
    assert {s.category for s in load_dataset(f"hf-disk:{tmp_path / 'saved'}", categories=["tile"])} == {"tile"}
    with pytest.raises(ZSADError, match=r"\['bottle'\] are not in"):
        load_dataset(f"hf-disk:{tmp_path / 'saved'}", categories=["bottle"])


def _renamed(layout_root, tmp_path, **renames):
    dataset = to_hf_dataset("mvtec", layout_root)
    for old, new in renames.items():
        dataset = dataset.rename_column(old, new)
    dataset.save_to_disk(tmp_path / "renamed")
    return f"hf-disk:{tmp_path / 'renamed'}"


def test_column_names_errors_list_the_columns(layout_root, tmp_path):
    name = _renamed(layout_root, tmp_path, image="picture", label="is_defective", mask="gt")
    with pytest.raises(ZSADError, match=r"no 'image' column for the images; its columns are \['picture', 'gt', 'is_defective', "
                                        r"'category', 'defect_type'\]\. Name the right one with --image-column"):
        load_dataset(name)
    with pytest.raises(ZSADError, match=r"no 'label' column .* --label-column"):
        load_dataset(name, columns={"image": "picture"})
    with pytest.raises(ZSADError, match=r"no column 'segmentation' \(--mask-column\); its columns are \['picture'"):
        load_dataset(name, columns={"image": "picture", "label": "is_defective", "mask": "segmentation"})
    with pytest.raises(ZSADError, match=r"Column 'category' \(images\) must hold images"):
        load_dataset(name, columns={"image": "category", "label": "is_defective"})
    # Named columns work; without a mask column the defects have no masks (image metrics only).
    samples = load_dataset(name, columns={"image": "picture", "label": "is_defective"})
    assert len(samples) == 8 and all(s.mask_path is None for s in samples)
    assert sum(s.mask_path is not None for s in load_dataset(name, columns={"image": "picture", "label": "is_defective", "mask": "gt"})) == 4


def test_optional_columns_default_and_string_labels(layout_root, tmp_path):
    dataset = to_hf_dataset("mvtec", layout_root).remove_columns(["category", "defect_type", "mask"])
    dataset = dataset.cast_column("label", datasets.Value("int64"))
    dataset = dataset.map(lambda row: {"label": ["good", "crack"][row["label"]]}, features=datasets.Features(
        {**dataset.features, "label": datasets.Value("string")}))
    datasets.DatasetDict({"train": dataset.select([0]), "test": dataset}).save_to_disk(tmp_path / "parts")
    samples = load_dataset(f"hf-disk:{tmp_path / 'parts'}")  # the DatasetDict's test split
    assert len(samples) == 8 and [s.label for s in samples] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {s.category for s in samples} == {"parts"} and {s.defect_type for s in samples} == {"good", "defect"}
    assert len(load_dataset(f"hf-disk:{tmp_path / 'parts'}:train")) == 1


def test_unreadable_hf_datasets_raise_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ZSADError, match="is not a folder; hf-disk:PATH needs a folder written by Dataset.save_to_disk"):
        load_dataset(f"hf-disk:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZSADError, match="is not a dataset saved with save_to_disk"):
        load_dataset(f"hf-disk:{tmp_path / 'empty'}")
    with pytest.raises(ZSADError, match="Could not load the Hub dataset my-org/parts"):  # offline in the tests
        load_dataset("hf:my-org/parts:test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ZSADError, match=r"'datasets' package: pip install datasets \(zsad's \[datasets\] extra"):
        load_dataset(f"hf-disk:{tmp_path}")


def test_dataset_push_uploads_the_layout(layout_root, monkeypatch, capsys):
    pushed = {}

    def fake_push(self, repo_id, **kwargs):  # the Hub cannot be reached here: record what would be pushed
        pushed.update(repo_id=repo_id, rows=self.to_list(), features=self.features, **kwargs)
        return type("Commit", (), {"commit_url": f"https://huggingface.co/datasets/{repo_id}/commit/1"})()

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push)
    assert main(["dataset", "push", "mvtec", str(layout_root), "my-org/parts", "--categories", "tile", "--private"]) == 0
    assert pushed["repo_id"] == "my-org/parts" and pushed["split"] == "test" and pushed["private"] is True
    rows = pushed["rows"]
    assert [(r["category"], r["defect_type"], r["label"]) for r in rows] == [
        (s.category, s.defect_type, s.label) for s in load_dataset("mvtec", layout_root, categories=["tile"])]
    assert all(r["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n" for r in rows)
    assert [r["mask"] is None for r in rows] == [r["label"] == 0 for r in rows]
    assert "4 images (2 anomalous) in 1 categories pushed to my-org/parts" in capsys.readouterr().out


def test_dataset_push_dry_run_saves_what_evaluate_reads(layout_root, tmp_path, capsys):
    assert main(["dataset", "push", "mvtec", str(layout_root), "my-org/parts", "--dry-run", str(tmp_path / "out")]) == 0
    assert f"--dataset hf-disk:{tmp_path / 'out'}" in capsys.readouterr().out
    assert len(load_dataset(f"hf-disk:{tmp_path / 'out'}")) == 8
    assert main(["dataset", "push", "mvtec", str(tmp_path / "nothing"), "my-org/parts"]) == 2
    assert "is not a folder" in capsys.readouterr().err
