"""Benchmark evaluation: the paper protocol over a dataset (``protocol``), few-shot runs with K references per
category over seeds (``few_shot``), and evaluation results read back and checked for a model card (``reports``)."""
