"""Product names as the prompts use them; no torch, so the torch-free runtime cleans names the same way."""

from .exceptions import ZSADError

MAX_CLASS_NAME_CHARS = 200


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
