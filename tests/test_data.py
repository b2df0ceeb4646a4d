"""Dataset readers on small trees in each benchmark's real layout (names, extensions, folders), and their errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad import ZSADError
from zsad.data import DATASETS, load_dataset, read_mask, write_meta
from zsad.data.synthetic import generate


def _image(path: Path, size=(40, 30), mask_box=None) -> Path:
    """An RGB image (or, with ``mask_box``, a 0/255 mask with that box set) of PIL ``size`` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask_box is None:
        Image.new("RGB", size, (120, 90, 60)).save(path)
    else:
        mask = Image.new("L", size, 0)
        mask.paste(255, mask_box)
        mask.save(path)
    return path


def _summary(samples):
    return sorted((s.category, s.defect_type, s.label, s.image_path.name, s.mask_path.name if s.mask_path else None) for s in samples)


def test_mvtec_layout_from_the_synthetic_generator(tmp_path):
    root = generate(tmp_path, categories=["wood", "disk"], num_good=2, num_defective=3, image_size=48)
    samples = load_dataset("mvtec", root)
    assert len(samples) == 10 and {s.category for s in samples} == {"wood", "disk"}
    defective = [s for s in samples if s.label]
    assert len(defective) == 6 and all(s.mask_path.name == s.image_path.stem + "_mask.png" for s in defective)
    assert all(s.mask_path.parent.parent.name == "ground_truth" for s in defective)
    assert all(read_mask(s).any() and read_mask(s).shape == (48, 48) for s in defective)
    assert len(load_dataset("mvtec", root, categories=["wood"])) == 5
    assert len(load_dataset("mvtec", root, split="train")) == 8


def test_normal_masks_are_all_zero_at_the_image_size(tmp_path):
    _image(tmp_path / "bottle" / "test" / "good" / "000.png", size=(40, 30))
    (sample,) = load_dataset("mvtec", tmp_path)
    mask = read_mask(sample)
    assert sample.mask_path is None and mask.dtype == bool and mask.shape == (30, 40) and not mask.any()


@pytest.mark.parametrize("name, category, normal, defect, image, mask", [
    ("mpdd", "bracket_black", "good", "hole", "000.png", "000_mask.png"),
    ("btad", "01", "ok", "ko", "0000.png", "0000.png"),
    ("btad", "03", "ok", "ko", "0000.bmp", "0000.bmp"),
    ("dtd", "Woven_001", "good", "bad", "000.png", "000_mask.png"),
    ("sdd", "SDD", "good", "defect", "kos01_Part5_0.png", "kos01_Part5_0_mask.png"),  # AdaCLIP conversion
    ("sdd", "SDD", "good", "bad", "kos02_Part1_1.png", "kos02_Part1_1.png"),  # mask named like the image
    ("dagm", "Class1", "good", "defect", "0001.PNG", "0001_label.PNG"),  # DAGM's own label names kept by the conversion
])
def test_mvtec_like_layouts(tmp_path, name, category, normal, defect, image, mask):
    folder = tmp_path / category
    _image(folder / "test" / normal / image)
    _image(folder / "test" / defect / image)
    _image(folder / "ground_truth" / defect / mask, mask_box=(5, 5, 15, 10))
    samples = load_dataset(name, tmp_path)
    assert _summary(samples) == sorted([(category, defect, 1, image, mask), (category, normal, 0, image, None)])
    assert read_mask([s for s in samples if s.label][0]).sum() == 10 * 5


def test_visa_split_csv(tmp_path):
    data = tmp_path / "candle" / "Data"
    _image(data / "Images" / "Normal" / "0000.JPG")
    _image(data / "Images" / "Normal" / "0001.JPG")
    _image(data / "Images" / "Anomaly" / "000.JPG")
    _image(data / "Masks" / "Anomaly" / "000.png", mask_box=(0, 0, 4, 4))
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n")
    samples = load_dataset("visa", tmp_path)
    assert _summary(samples) == [("candle", "anomaly", 1, "000.JPG", "000.png"), ("candle", "good", 0, "0000.JPG", None)]
    assert read_mask(samples[1]).sum() == 16
    assert [s.image_path.name for s in load_dataset("visa", tmp_path, split="train")] == ["0001.JPG"]


def test_meta_json_round_trip(tmp_path):
    root = generate(tmp_path, categories=["tile"], num_good=2, num_defective=2, image_size=40)
    samples = load_dataset("mvtec", root)
    path = write_meta(samples, root)
    meta = json.loads(path.read_text())
    entry = next(e for e in meta["test"]["tile"] if e["anomaly"] == 1)
    assert set(entry) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
    assert entry["img_path"].startswith("tile/test/") and entry["mask_path"].startswith("tile/ground_truth/")
    assert all(e["mask_path"] == "" for e in meta["test"]["tile"] if e["anomaly"] == 0)
    assert sorted(load_dataset("meta", root), key=str) == sorted(samples, key=str)


def test_plain_folder_with_and_without_masks(tmp_path):
    product = tmp_path / "my part"
    _image(product / "good" / "a.jpg")
    _image(product / "dent" / "b.jpg")
    _image(product / "scratch" / "c.png")
    _image(product / "masks" / "dent" / "b.png", mask_box=(1, 1, 3, 3))
    samples = load_dataset("folder", product)
    assert _summary(samples) == [("my part", "dent", 1, "b.jpg", "b.png"), ("my part", "good", 0, "a.jpg", None),
                                 ("my part", "scratch", 1, "c.png", None)]
    assert len(load_dataset("folder", tmp_path)) == 3  # a folder of category folders


@pytest.mark.parametrize("normal", ["good", "OK", "Normal", "nominal", "PASS"])
def test_plain_folder_takes_the_usual_names_of_normal_folders_in_any_case(tmp_path, normal):
    _image(tmp_path / "part" / normal / "a.png")
    _image(tmp_path / "part" / "dent" / "b.png")
    assert _summary(load_dataset("folder", tmp_path)) == sorted([("part", "dent", 1, "b.png", None), ("part", normal, 0, "a.png", None)])


def test_other_normal_folder_names_with_normal_dirs(tmp_path):
    _image(tmp_path / "Reference" / "a.png")
    _image(tmp_path / "dent" / "b.png")
    with pytest.raises(ZSADError) as error:
        load_dataset("folder", tmp_path)
    # The message lists what is there and the names it expects.
    assert "found Reference/, dent/" in str(error.value) and "good / nominal / normal / ok / pass" in str(error.value)
    assert "--normal-dirs" in str(error.value)
    samples = load_dataset("folder", tmp_path, normal_dirs=["reference"])
    assert _summary(samples) == [(tmp_path.name, "Reference", 0, "a.png", None), (tmp_path.name, "dent", 1, "b.png", None)]
    with pytest.raises(ZSADError, match="plain 'folder' layout; 'mvtec' has fixed names"):
        load_dataset("mvtec", tmp_path, normal_dirs=["reference"])
    with pytest.raises(ZSADError, match="give its root"):
        load_dataset("folder", None)


@pytest.mark.parametrize("name, build, message", [
    ("mvtec", lambda root: _image(root / "bottle" / "test" / "crack" / "000.png"), "No mask for defective image .*000_mask.png"),
    ("mvtec", lambda root: _image(root / "bottle" / "train" / "good" / "000.png"), "expected <category>/test/<defect>/<image>.*found bottle/"),
    ("btad", lambda root: (root / "01" / "test").mkdir(parents=True), "No images in .*01/test"),
    ("visa", lambda root: _image(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG"), "split_csv/1cls.csv"),
    ("meta", lambda root: (root / "meta.json").write_text('{"train": {}}'), "meta.json must be"),
    ("meta", lambda root: (root / "meta.json").write_text('{"test": {"x": [{"img_path": "x.png", "mask_path": "", "anomaly": 0}]}}'),
     "do not exist"),
    ("folder", lambda root: _image(root / "scratch" / "a.png"), "expected a folder of normal images named good / nominal"),
])
def test_broken_trees_raise_one_clear_error(tmp_path, name, build, message):
    build(tmp_path)
    with pytest.raises(ZSADError, match=message):
        load_dataset(name, tmp_path)


def test_unknown_names_and_categories(tmp_path):
    assert {"mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd", "meta", "folder"} <= set(DATASETS)
    with pytest.raises(ZSADError, match="Unknown dataset 'kitti'"):
        load_dataset("kitti", tmp_path)
    generate(tmp_path, categories=["tile"], num_good=1, num_defective=1, image_size=40)
    with pytest.raises(ZSADError, match=r"\['bottle'\] are not in"):
        load_dataset("mvtec", tmp_path, categories=["bottle"])
    with pytest.raises(ZSADError, match="is not a folder"):
        load_dataset("mvtec", tmp_path / "missing")
    assert np.asarray(read_mask(load_dataset("mvtec", tmp_path)[0])).ndim == 2
