"""Product names as the prompts use them; no torch, so the torch-free runtime cleans names the same way."""

from .exceptions import ZSADError

MAX_CLASS_NAME_CHARS = 200
# The product's name where none is given and none is needed: a method whose prompts name no product (AnomalyCLIP),
# or mutual scoring without text; AnomalyCLIP's own object-agnostic word.
UNNAMED_PRODUCT = "object"


def clean_class_name(name: str) -> str:
    """Dataset folder names to words ("metal_nut" -> "metal nut"); rejects empty and over-long names."""
    if not isinstance(name, str):
        raise ZSADError(f"A class name must be a string, got {type(name).__name__}.")
    cleaned = " ".join(name.replace("_", " ").split())
    if not cleaned:
        raise ZSADError("The class name is empty: type what the product is, e.g. 'bottle' or 'metal nut'.")
    if len(cleaned) > MAX_CLASS_NAME_CHARS:
        raise ZSADError(
            f"The class name has {len(cleaned)} characters; keep it under {MAX_CLASS_NAME_CHARS} "
            "(a short product name such as 'screw' works best)."
        )
    return cleaned


def product_name(name: str | None, required: bool = True) -> str:
    """``clean_class_name(name)``; when the name is not ``required`` (the prompts name no product), an empty or
    missing name is ``UNNAMED_PRODUCT``."""
    if not required and (name is None or (isinstance(name, str) and not name.strip())):
        return UNNAMED_PRODUCT
    return clean_class_name(name)
