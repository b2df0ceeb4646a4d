"""Datasets: readers for the public benchmarks and users' folders (``load_dataset``), and a synthetic generator."""

from .readers import DATASETS, Sample, load_dataset, read_mask, write_meta

__all__ = ["DATASETS", "Sample", "load_dataset", "read_mask", "write_meta"]
