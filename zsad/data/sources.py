"""``load_dataset``: a dataset's test (or train) samples from a folder layout (``readers``) or a Hugging Face
dataset (``hf``); the one module that knows both, so neither imports the other's caller."""

from collections.abc import Sequence

from .hf import is_hf_dataset, load_hf_samples
from .readers import Sample, read_layout


def load_dataset(name: str, root=None, categories: Sequence[str] | None = None, split: str = "test",
                 normal_dirs: Sequence[str] = (), columns: dict[str, str | None] | None = None) -> list[Sample]:
    """Samples of dataset ``name`` (a key of ``DATASETS``) under ``root``, optionally only some ``categories``;
    ``normal_dirs`` adds names of normal-image folders to the plain ``folder`` layout's. ``name`` can also be a
    Hugging Face dataset, ``hf:ORG/NAME[:split]`` or ``hf-disk:PATH[:split]`` (no root; ``columns`` renames its
    columns, see ``zsad.data.hf``)."""
    if is_hf_dataset(name):
        return load_hf_samples(name, categories, columns)
    return read_layout(name, root, categories, split, normal_dirs)
