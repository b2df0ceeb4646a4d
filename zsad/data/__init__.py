"""Datasets: readers for the public benchmarks, users' folders and Hugging Face datasets (``load_dataset``),
their conversion to a Hugging Face dataset (``to_hf_dataset``), and a synthetic generator."""

from .hf import to_hf_dataset
from .readers import DATASETS, NORMAL_FOLDERS, Sample, read_mask, write_meta
from .sources import load_dataset

__all__ = ["DATASETS", "NORMAL_FOLDERS", "Sample", "load_dataset", "read_mask", "to_hf_dataset", "write_meta"]
