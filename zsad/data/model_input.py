"""Dataset samples as model input (torch ``Dataset``s), shared by evaluation and training.

Items are dicts, so torch's ``default_collate`` batches them (tensors stacked, labels to a tensor, names to a list).
"""

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..modeling.image_processing_zsad import ZSADImageProcessor
from ..runtime.images import load_image
from .readers import Sample, read_mask


class ImageSet(Dataset):
    """``{"pixel_values": (3, S, S), "index": position in samples}`` per sample, pre-processed by ``processor`` (the
    model's, ``model.image_processor``)."""

    def __init__(self, samples: list[Sample], processor: ZSADImageProcessor):
        self.samples = list(samples)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image = load_image(self.samples[index].image_path)
        return {"pixel_values": self.processor.pixel_values([image])[0], "index": index}


class TrainingSet(ImageSet):
    """``ImageSet`` items plus the targets: ``masks`` (S, S) 0/1, ``labels`` 0/1 and ``class_names``."""

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            **super().__getitem__(index),
            "masks": load_mask(sample, self.processor.size),
            "labels": int(sample.label),
            "class_names": sample.category,
        }


def load_mask(sample: Sample, size: int) -> torch.Tensor:
    """(size, size) 0/1 ground truth of a sample, resized with nearest neighbour (all zeros without a mask)."""
    return torch.tensor(resized_mask(read_mask(sample), size), dtype=torch.float32)


def resized_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean (H, W) mask at (size, size), nearest neighbour (it stays binary)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127
