"""Prompt text: state words x templates (APRIL-GAN / WinCLIP lineage), class-name checks, ensembles."""

import torch
import torch.nn.functional as F

from .class_names import MAX_CLASS_NAME_CHARS, clean_class_name  # noqa: F401  (public here too)
from .exceptions import ZSADError

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
STATE_WORDS = (NORMAL_STATES, ABNORMAL_STATES)
# Tokens per text-encoder call when encoding many prompts; see prompt_ensemble_features.
TEXT_TOKENS_PER_CHUNK = 512


def class_names_for_batch(class_names: str | list[str], batch_size: int) -> list[str]:
    """One cleaned name per image: a single string is used for the whole batch."""
    names = [class_names] * batch_size if isinstance(class_names, str) else list(class_names)
    if len(names) != batch_size:
        raise ZSADError(f"Got {len(names)} class names for {batch_size} images; pass one name per image or one for all.")
    return [clean_class_name(name) for name in names]


def state_prompts(class_name: str, states: tuple[str, ...], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every template filled with every state phrase of ``class_name``."""
    return [template.format(state.format(class_name)) for state in states for template in templates]


def prompt_ensemble_features(backbone, class_names: list[str], templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
    """(C, 2, P) normalised (normal, abnormal) text features: mean of each state's prompt features.

    Each name's pair is computed once per backbone and shared by the models on it (``frozen_features``).
    Prompts go through the text encoder as prefix trees (``CLIPBackbone.encode_prompts``: a start shared by
    several prompts is computed once) in chunks of at most ``TEXT_TOKENS_PER_CHUNK`` tokens: the MLP's
    activations (four float32 copies of 3072 values per token) stay near 25 MB, where 420 prompts at once take
    300 MB, and the 420 prompts of one name encode faster than in chunks of 105 (3.8 s vs 4.4 s on 2 cores).
    """
    return backbone.frozen_features_per_name(
        ("state ensemble", templates), class_names, lambda name: _ensemble_pair(backbone, name, templates)
    )


def _ensemble_pair(backbone, name: str, templates: tuple[str, ...]) -> torch.Tensor:
    prompts = [state_prompts(name, states, templates) for states in STATE_WORDS]
    features = backbone.encode_prompts(prompts[0] + prompts[1], TEXT_TOKENS_PER_CHUNK)
    normal, abnormal = features.split([len(prompts[0]), len(prompts[1])])
    return F.normalize(torch.stack([normal.mean(dim=0), abnormal.mean(dim=0)]), dim=-1)
