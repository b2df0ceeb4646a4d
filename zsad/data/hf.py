"""Anomaly-detection datasets as Hugging Face ``datasets``: evaluate on one, or turn any layout zsad reads into one.

```python
>>> from zsad.data import to_hf_dataset, load_dataset
>>> dataset = to_hf_dataset("mvtec", "/data/mvtec_anomaly_detection")  # image, mask, label, category, defect_type
>>> dataset.save_to_disk("mvtec-hf")                                    # or dataset.push_to_hub("my-org/mvtec-ad", split="test")
>>> samples = load_dataset("hf-disk:mvtec-hf")                          # or "hf:my-org/mvtec-ad" ("hf:ORG/NAME:split")
```

Dataset names: ``hf:ORG/NAME[:split]`` (``datasets.load_dataset``, split ``test`` by default) and
``hf-disk:PATH[:split]`` (a folder written by ``save_to_disk``; a ``DatasetDict``'s ``test`` split or its only one).
Columns (renamable): ``image`` (images), ``label`` (0 / 1, a ``ClassLabel`` or bool; or a string, normal when it
is a normal-folder name such as ``good``), and optionally ``mask`` (images; empty for normal images and for defects
without masks), ``category`` (default: the dataset's name) and ``defect_type``. The evaluation reads image files, so
the images are written once, with their original bytes, under ``HF_DATASETS_CACHE/zsad-files/<fingerprint>/``.
``datasets`` is imported only here, when one of these is used (the ``[datasets]`` extra).
"""

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..modeling.exceptions import ZSADError
from ..runtime.images import IMAGE_SUFFIXES
from .readers import NORMAL_FOLDERS, Sample, read_layout

HUB_PREFIX = "hf:"
DISK_PREFIX = "hf-disk:"
COLUMNS = ("image", "mask", "label", "category", "defect_type")
REQUIRED_COLUMNS = ("image", "label")
LABEL_NAMES = ["normal", "anomalous"]
COMPLETE_MARKER = ".complete"


def is_hf_dataset(name: str) -> bool:
    """Whether a dataset name (``--dataset``) names a Hugging Face dataset (``hf:...`` or ``hf-disk:...``)."""
    return name.startswith((HUB_PREFIX, DISK_PREFIX))


def _datasets():
    try:
        import datasets
    except ImportError as error:
        raise ZSADError("Hugging Face datasets need the 'datasets' package: pip install datasets (zsad's [datasets] "
                        "extra; in a zsad checkout: pip install -e '.[datasets]').") from error
    return datasets


def to_hf_dataset(layout: str, root, categories: Sequence[str] | None = None, split: str = "test",
                  normal_dirs: Sequence[str] = (), cache_dir=None):
    """A ``datasets.Dataset`` of every sample of ``layout`` (a ``zsad.data.DATASETS`` name) under ``root``: columns
    image, mask (None for normal images and unannotated defects), label (``ClassLabel`` normal / anomalous),
    category and defect_type. Images and masks hold the files' own bytes, so the dataset stands on its own."""
    datasets = _datasets()
    samples = read_layout(layout, root, categories, split, normal_dirs)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "label": datasets.ClassLabel(names=LABEL_NAMES), "category": datasets.Value("string"),
                                  "defect_type": datasets.Value("string")})
    return datasets.Dataset.from_generator(_rows, features=features, gen_kwargs={"samples": samples},
                                           cache_dir=None if cache_dir is None else str(cache_dir),
                                           fingerprint=_files_fingerprint(samples), split=split)


def _rows(samples: list[Sample]) -> Iterator[dict]:
    for sample in samples:
        yield {"image": _file(sample.image_path), "mask": _file(sample.mask_path) if sample.mask_path else None,
               "label": sample.label, "category": sample.category, "defect_type": sample.defect_type}


def _file(path: Path) -> dict:
    return {"bytes": Path(path).read_bytes(), "path": Path(path).name}


def _files_fingerprint(samples: list[Sample]) -> str:
    """Changes when any file, label or name changes (so a rebuilt dataset is not served from a stale cache)."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image_path, sample.mask_path):
            stat = Path(path).stat() if path else None
            digest.update(f"{path}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}|".encode())
        digest.update(f"{sample.label}|{sample.category}|{sample.defect_type}\n".encode())
    return digest.hexdigest()[:32]


def load_hf_samples(name: str, categories: Sequence[str] | None = None, columns: dict[str, str | None] | None = None,
                    files_dir=None) -> list[Sample]:
    """Samples of the Hugging Face dataset ``name`` (``hf:ORG/NAME[:split]`` or ``hf-disk:PATH[:split]``), its
    images written to ``files_dir`` (default: under ``HF_DATASETS_CACHE``). ``columns`` renames the columns
    ({"image": "img", "mask": None, ...}; None or missing keeps the default name)."""
    datasets = _datasets()
    dataset = _open(datasets, name)
    names = _column_names(dataset, columns or {})
    for role in ("image", "mask"):
        if names[role]:
            if not isinstance(dataset.features[names[role]], datasets.Image):
                raise ZSADError(f"Column '{names[role]}' ({role}s) must hold images (datasets.Image); "
                                f"it holds {dataset.features[names[role]]}.")
            dataset = dataset.cast_column(names[role], datasets.Image(decode=False))
    directory = Path(files_dir) if files_dir else Path(datasets.config.HF_DATASETS_CACHE) / "zsad-files" / dataset._fingerprint
    default_category = name.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
    samples = _write_samples(dataset, names, directory, default_category)
    if categories is not None:
        missing = sorted(set(categories) - {s.category for s in samples})
        if missing:
            raise ZSADError(f"Categories {missing} are not in {name}; it holds {sorted({s.category for s in samples})}.")
        samples = [s for s in samples if s.category in set(categories)]
    return samples


def _open(datasets, name: str):
    """The split named in ``name`` (``test`` by default) of a Hub dataset or a ``save_to_disk`` folder."""
    if name.startswith(DISK_PREFIX):
        path, split = name[len(DISK_PREFIX):], None
        if not Path(path).exists() and ":" in path:
            path, split = path.rsplit(":", 1)
        if not Path(path).is_dir():
            raise ZSADError(f"{path} is not a folder; hf-disk:PATH needs a folder written by Dataset.save_to_disk.")
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as error:
            raise ZSADError(f"{path} is not a dataset saved with save_to_disk ({error}).") from error
        return _split(loaded, split, path)
    repo, _, split = name[len(HUB_PREFIX):].partition(":")
    try:
        return datasets.load_dataset(repo, split=split or "test")
    except Exception as error:  # offline, unknown repo, unknown split: one clear message
        raise ZSADError(f"Could not load the Hub dataset {repo} (split {split or 'test'}): {error}") from error


def _split(loaded, split: str | None, path: str):
    if not hasattr(loaded, "keys"):  # a single Dataset
        return loaded
    splits = sorted(loaded.keys())
    chosen = split or ("test" if "test" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise ZSADError(f"{path} holds the splits {splits}; name one: hf-disk:{path}:SPLIT.")
    return loaded[chosen]


def _column_names(dataset, columns: dict[str, str | None]) -> dict[str, str | None]:
    """Column of each role; a required column, or one named on purpose, that is missing is an error."""
    present = list(dataset.column_names)
    names = {}
    for role in COLUMNS:
        chosen = columns.get(role)
        if chosen is not None and chosen not in present:
            raise ZSADError(f"The dataset has no column '{chosen}' ({_option(role)}); its columns are {present}.")
        name = chosen or role
        if name not in present and role in REQUIRED_COLUMNS:
            raise ZSADError(f"The dataset has no '{name}' column for the {role}s; its columns are {present}. "
                            f"Name the right one with {_option(role)}.")
        names[role] = name if name in present else None
    return names


def _option(role: str) -> str:
    return f"--{role.replace('_', '-')}-column"


def _write_samples(dataset, names: dict[str, str | None], directory: Path, default_category: str) -> list[Sample]:
    """One Sample per row; images and masks written to ``directory`` once (a marker file says it is complete)."""
    written = (directory / COMPLETE_MARKER).exists()
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, row in enumerate(dataset):
        label = _label(row[names["label"]], index)
        image = _image_file(row[names["image"]], directory / f"{index:06d}-image", written)
        if image is None:
            raise ZSADError(f"Row {index} has no image in column '{names['image']}'.")
        mask = _image_file(row[names["mask"]], directory / f"{index:06d}-mask", written) if names["mask"] else None
        category = str(row[names["category"]]) if names["category"] else default_category
        defect = str(row[names["defect_type"]]) if names["defect_type"] else ("defect" if label else "good")
        samples.append(Sample(image, mask if label else None, label, category, defect))
    (directory / COMPLETE_MARKER).touch()
    return samples


def _label(value, index: int) -> int:
    if isinstance(value, str):
        return 0 if value.strip().lower() in NORMAL_FOLDERS else 1
    if value is None or value not in (0, 1):
        raise ZSADError(f"Row {index} has the label {value!r}; labels must be 0 (normal) / 1 (anomalous), a bool, "
                        f"or a string ({', '.join(NORMAL_FOLDERS)} = normal).")
    return int(value)


def _image_file(value: dict | None, stem: Path, written: bool) -> Path | None:
    """The image of an undecoded ``datasets.Image`` value as a file: its own bytes written once, or its local path."""
    if value is None:
        return None
    if value.get("bytes") is None:
        if not value.get("path") or not Path(value["path"]).is_file():
            raise ZSADError(f"An image of the dataset has neither bytes nor a local file ({value.get('path')!r}).")
        return Path(value["path"])
    suffix = Path(value.get("path") or "").suffix.lower()
    path = stem.with_suffix(suffix if suffix in IMAGE_SUFFIXES else ".png")  # PIL reads the format from the bytes
    if not written:
        path.write_bytes(value["bytes"])
    return path
