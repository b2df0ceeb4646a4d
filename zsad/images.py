"""Reading any image a user may bring, and turning images into model input.

``load_image`` accepts paths, bytes, PIL images and numpy arrays and always returns an upright 8-bit RGB
PIL image, or raises one ``ZSADError`` saying what is wrong (unreadable, truncated, too large, too small).
The implementation lives in ``zsad/modeling/image_processing_zsad.py``: the pipeline saved with every checkpoint
reads images with the same code. Importing it does not import torch (``zsad.deploy`` uses it without torch).
"""

from .modeling.image_processing_zsad import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, load_image, normalised_pixels, to_pixel_values

# The file suffixes zsad reads as images, everywhere (folders given to predict, dataset readers).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "load_image", "normalised_pixels", "to_pixel_values"]
