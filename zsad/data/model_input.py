"""Dataset samples as model input (torch ``Dataset``s), shared by evaluation and training.

Items are dicts, so torch's ``default_collate`` batches them (tensors stacked, labels to a tensor, names to a list).
"""

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import load_image, to_pixel_values
from .readers import Sample, read_mask


class ImageSet(Dataset):
    """``{"pixel_values": (3, S, S), "index": position in samples}`` per sample."""

    def __init__(self, samples: list[Sample], image_size: int, image_mean, image_std):
        self.samples = list(samples)
        self.image_size = image_size
        self.image_mean, self.image_std = image_mean, image_std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image = load_image(self.samples[index].image_path)
        return {"pixel_values": to_pixel_values([image], self.image_size, self.image_mean, self.image_std)[0], "index": index}


class TrainingSet(ImageSet):
    """``ImageSet`` items plus the targets: ``masks`` (S, S) 0/1, ``labels`` 0/1 and ``class_names``."""

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            **super().__getitem__(index),
            "masks": load_mask(sample, self.image_size),
            "labels": int(sample.label),
            "class_names": sample.category,
        }


def load_mask(sample: Sample, size: int) -> torch.Tensor:
    """(size, size) 0/1 ground truth of a sample, resized with nearest neighbour (all zeros without a mask)."""
    return torch.tensor(resized_mask(read_mask(sample), size), dtype=torch.float32)


def resized_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean (H, W) mask at (size, size), nearest neighbour (it stays binary)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127
