"""Readers for the public anomaly-detection benchmarks and for users' own folders.

```python
>>> from zsad.data import load_dataset, read_mask
>>> samples = load_dataset("mvtec", "/data/mvtec_anomaly_detection", categories=["bottle"])
>>> samples[0]
Sample(image_path=PosixPath('.../bottle/test/broken_large/000.png'),
       mask_path=PosixPath('.../bottle/ground_truth/broken_large/000_mask.png'), label=1, category='bottle', defect_type='broken_large')
>>> read_mask(samples[0]).shape   # native (H, W), bool
(900, 900)
```

Most benchmarks share the MVTec-AD layout ``<root>/<category>/<split>/<defect>/<image>`` with masks in
``<root>/<category>/ground_truth/<defect>/``; one parametrised reader (``MVTecLikeLayout``) covers MVTec-AD,
MPDD, BTAD (``ok``/``ko``), DTD-Synthetic and the MVTec-like conversions of KolektorSDD and DAGM made for
AnomalyCLIP / AdaCLIP. VisA is read from its ``split_csv/1cls.csv``, the AnomalyCLIP / AdaCLIP / APRIL-GAN
interchange file from ``meta.json``, and users' own data from a plain folder (a normal folder such as ``good/`` or ``ok/`` + defect folders).
"""

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..modeling.exceptions import ZSADError
from ..runtime.images import IMAGE_SUFFIXES

# Mask file = image stem + one of these (MVTec "000_mask.png", BTAD/VisA "000.png", DAGM conversions "_label").
MASK_STEM_SUFFIXES = ("_mask", "_label", "_gt", "")
MASK_FOLDERS = ("ground_truth", "masks")  # the plain folder layout accepts either name
NORMAL_FOLDERS = ("good", "ok", "normal", "nominal", "pass")  # the plain folder layout's normal images, any case


@dataclass(frozen=True)
class Sample:
    """One test image: label 1 = defective; ``mask_path`` is None for normal images (and unannotated defects)."""

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str


@dataclass(frozen=True)
class MVTecLikeLayout:
    """``<root>/<category>/<split>/<defect>/<image>``, masks in ``<category>/ground_truth/<defect>/``."""

    normal_folders: tuple[str, ...] = ("good",)
    example: str = "bottle/test/broken_large/000.png with bottle/ground_truth/broken_large/000_mask.png"


def read_mask(sample: Sample) -> np.ndarray:
    """The ground truth as a bool (H, W) array at native resolution; all False (image's H, W) without a mask."""
    if sample.mask_path is None:
        with Image.open(sample.image_path) as image:  # reads only the header
            width, height = image.size
        return np.zeros((height, width), dtype=bool)
    with Image.open(sample.mask_path) as mask:
        return np.asarray(mask.convert("L")) > 0  # masks are 0/255 (MVTec, BTAD) or 0/k labels (VisA)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if is_image(path))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(path.name + ("/" if path.is_dir() else "") for path in folder.iterdir())
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "nothing (empty folder)"


def _check_root(root) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ZSADError(f"Dataset root {root} is not a folder.")
    return root


def _select(available: dict[str, Path], categories: Sequence[str] | None, root: Path, expected: str) -> dict[str, Path]:
    if not available:
        raise ZSADError(f"No categories found in {root}: expected {expected}; found {_listing(root)}.")
    return {name: available[name] for name in requested_names(categories, available, str(root))}


def requested_names(requested: str | Sequence[str] | None, available, where: str) -> list[str]:
    """``requested`` (None for all, one name or several) checked against the names ``available`` in ``where``."""
    if requested is None:
        return list(available)
    names = [requested] if isinstance(requested, str) else list(requested)
    missing = [name for name in names if name not in available]
    if missing:
        raise ZSADError(f"Categories {missing} are not in {where}; it holds {sorted(available)}.")
    return names


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of one defect folder by the image stem they belong to."""
    if not folder.is_dir():
        return {}
    index = {}
    for path in _images_in(folder):
        for suffix in MASK_STEM_SUFFIXES:
            if path.stem.endswith(suffix):
                index.setdefault(path.stem[: len(path.stem) - len(suffix)], path)
                break
    return index


def _scan_category(category: str, image_root: Path, mask_root: Path | None, normal_folders: Sequence[str],
                   require_masks: bool, skip: Sequence[str] = ()) -> list[Sample]:
    """Samples of ``image_root/<defect>/<image>``; masks of defect images from ``mask_root/<defect>/``."""
    samples = []
    for folder in _subfolders(image_root):
        if folder.name in skip:
            continue
        normal = folder.name in normal_folders
        masks = {} if normal or mask_root is None else _mask_index(mask_root / folder.name)
        for image in _images_in(folder):
            mask = masks.get(image.stem)
            if mask is None and not normal and require_masks:
                raise ZSADError(
                    f"No mask for defective image {image}: expected {mask_root / folder.name / (image.stem + '_mask.png')} "
                    f"(or {image.stem}.png / .bmp) in {mask_root / folder.name}."
                )
            samples.append(Sample(image, mask, 0 if normal else 1, category, folder.name))
    return samples


def read_mvtec_like(root, categories: Sequence[str] | None = None, split: str = "test",
                    layout: MVTecLikeLayout = MVTecLikeLayout()) -> list[Sample]:
    """Samples of an MVTec-AD-like tree (see ``MVTecLikeLayout``); defect images must have masks."""
    root = _check_root(root)
    expected = f"<category>/{split}/<defect>/<image> folders, e.g. {layout.example}"
    available = {folder.name: folder for folder in _subfolders(root) if (folder / split).is_dir()}
    samples = []
    for category, folder in _select(available, categories, root, expected).items():
        found = _scan_category(category, folder / split, folder / "ground_truth", layout.normal_folders,
                               require_masks=split != "train")
        if not found:
            raise ZSADError(f"No images in {folder / split}: expected {expected}; found {_listing(folder / split)}.")
        samples += found
    return samples


def read_visa(root, categories: Sequence[str] | None = None, split: str = "test") -> list[Sample]:
    """VisA from ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask; paths relative to root)."""
    root = _check_root(root)
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise ZSADError(f"VisA needs {table} (from the VisA repository's split_csv); found {_listing(root)}.")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {"object", "split", "label", "image", "mask"}
    if not rows or not columns <= set(rows[0]):
        raise ZSADError(f"{table} must have the columns {sorted(columns)}; found {sorted(rows[0]) if rows else 'no rows'}.")
    by_category: dict[str, list[Sample]] = {}
    for row in rows:
        if row["split"] != split:
            continue
        anomalous = row["label"].strip().lower() == "anomaly"
        mask = root / row["mask"] if anomalous and row["mask"].strip() else None
        sample = Sample(root / row["image"], mask, int(anomalous), row["object"], "anomaly" if anomalous else "good")
        by_category.setdefault(row["object"], []).append(sample)
    chosen = _select(by_category, categories, table, f"rows with split '{split}'")
    return _existing([sample for category in chosen for sample in by_category[category]], table)


def read_meta(root, categories: Sequence[str] | None = None, split: str = "test") -> list[Sample]:
    """The ``meta.json`` of AnomalyCLIP / AdaCLIP / APRIL-GAN: {split: {category: [{img_path, mask_path,
    cls_name, specie_name, anomaly}]}} with paths relative to ``root``; ``mask_path`` "" for normal images."""
    root = _check_root(root)
    path = root / "meta.json"
    if not path.is_file():
        raise ZSADError(f"No meta.json in {root}; found {_listing(root)}.")
    try:
        meta = json.loads(path.read_text())
        entries = {str(category): list(items) for category, items in meta[split].items()}
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise ZSADError(f"{path} must be {{'{split}': {{category: [entries]}}, ...}}; reading it failed: {error!r}.") from error
    chosen = _select(entries, categories, path, f"categories under '{split}'")
    samples = [_meta_sample(root, category, entry, path) for category in chosen for entry in entries[category]]
    return _existing(samples, path)


def _meta_sample(root: Path, category: str, entry: dict, source: Path) -> Sample:
    try:
        label = int(entry["anomaly"])
        mask = entry.get("mask_path") or None
        return Sample(root / entry["img_path"], root / mask if mask else None, label, str(entry.get("cls_name", category)),
                      str(entry.get("specie_name") or ("bad" if label else "good")))
    except (KeyError, TypeError, ValueError) as error:
        raise ZSADError(f"Entry {entry!r} in {source} needs img_path, mask_path and anomaly (0/1): {error!r}.") from error


def write_meta(samples: Sequence[Sample], root, split: str = "test", train_samples: Sequence[Sample] = ()) -> Path:
    """Write ``<root>/meta.json`` for ``samples`` (paths relative to ``root``), readable by ``read_meta`` and
    by AnomalyCLIP / AdaCLIP / APRIL-GAN."""
    root = Path(root)
    meta = {"train": {}, "test": {}}
    for key, group in ((split, samples), ("train", train_samples)):
        for sample in group:
            meta.setdefault(key, {}).setdefault(sample.category, []).append(_meta_entry(sample, root))
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _meta_entry(sample: Sample, root: Path) -> dict:
    def relative(path: Path) -> str:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()

    return {"img_path": relative(sample.image_path), "mask_path": relative(sample.mask_path) if sample.mask_path else "",
            "cls_name": sample.category, "specie_name": sample.defect_type, "anomaly": sample.label}


def read_folder(root, categories: Sequence[str] | None = None, split: str = "test",
                normal_dirs: Sequence[str] = ()) -> list[Sample]:
    """Users' own data: a folder of normal images (``good/``, ``ok/``, ``normal/``, ``nominal/`` or ``pass/``, any
    case, or a name in ``normal_dirs``), every other folder defective, optional masks in ``<root>/masks/<defect>/``
    (or ``ground_truth/``) named like the image (``<stem>.png`` or ``<stem>_mask.png``). ``root`` is one category
    (named after the folder) or holds several such category folders. ``split`` is unused."""
    root = _check_root(root)
    normal_names = {name.lower() for name in (*NORMAL_FOLDERS, *normal_dirs)}
    expected = (f"a folder of normal images named {' / '.join(sorted(normal_names))} (any case; others with "
                "--normal-dirs NAME) and defect folders of images (optional masks/<defect>/), or category folders holding them")

    def normal_folders(folder: Path) -> tuple[str, ...]:
        return tuple(sub.name for sub in _subfolders(folder) if sub.name.lower() in normal_names)

    if normal_folders(root):
        available = {root.name: root}
    else:
        available = {folder.name: folder for folder in _subfolders(root) if normal_folders(folder)}
    samples = []
    for category, folder in _select(available, categories, root, expected).items():
        mask_root = next((folder / name for name in MASK_FOLDERS if (folder / name).is_dir()), None)
        samples += _scan_category(category, folder, mask_root, normal_folders(folder), require_masks=False, skip=MASK_FOLDERS)
    if not samples:
        raise ZSADError(f"No images in {root}: expected {expected}; found {_listing(root)}.")
    return samples


def _existing(samples: list[Sample], source: Path) -> list[Sample]:
    missing = [str(path) for sample in samples for path in (sample.image_path, sample.mask_path) if path and not path.is_file()]
    if missing:
        raise ZSADError(f"{len(missing)} files listed in {source} do not exist, e.g. {missing[:3]}; check the dataset root.")
    return samples


def _mvtec_like(**layout) -> Callable[..., list[Sample]]:
    def read(root, categories=None, split="test"):
        return read_mvtec_like(root, categories, split, MVTecLikeLayout(**layout))

    return read


# Dataset name -> reader(root, categories=None, split="test").
DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "mvtec": _mvtec_like(),
    "mpdd": _mvtec_like(example="bracket_black/test/hole/000.png with bracket_black/ground_truth/hole/000_mask.png"),
    "btad": _mvtec_like(normal_folders=("ok",), example="01/test/ko/0000.bmp with 01/ground_truth/ko/0000.png"),
    "dtd": _mvtec_like(example="Woven_001/test/bad/000.png with Woven_001/ground_truth/bad/000_mask.png"),
    "sdd": _mvtec_like(example="SDD/test/defect/kos01_Part5_0.png with SDD/ground_truth/defect/kos01_Part5_0_mask.png"),
    "dagm": _mvtec_like(example="Class1/test/defect/0001.PNG with Class1/ground_truth/defect/0001_label.PNG"),
    "visa": read_visa,
    "meta": read_meta,
    "folder": read_folder,
}


def read_layout(name: str, root=None, categories: Sequence[str] | None = None, split: str = "test",
                normal_dirs: Sequence[str] = ()) -> list[Sample]:
    """Samples of the folder layout ``name`` (a key of ``DATASETS``) under ``root``, optionally only some
    ``categories``; ``normal_dirs`` adds names of normal-image folders to the plain ``folder`` layout's. Hugging Face
    datasets are read by ``zsad.data.load_dataset``."""
    reader = DATASETS.get(name.lower())
    if reader is None:
        raise ZSADError(f"Unknown dataset '{name}'; choose from {sorted(DATASETS)}, hf:ORG/NAME[:split] or hf-disk:PATH.")
    if root is None:
        raise ZSADError(f"Dataset '{name}' is read from a folder: give its root (--root DIR).")
    if normal_dirs:
        if reader is not read_folder:
            raise ZSADError(f"--normal-dirs names the normal folders of the plain 'folder' layout; '{name}' has fixed names.")
        return read_folder(root, categories, split, normal_dirs)
    return reader(root, categories, split)
