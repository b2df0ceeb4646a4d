"""Class Name Filtering (CNF, GenCLIP): the frozen CLIP decides whether a class name means something for
the image; a name it does not recognise is replaced by a generic word (METHODS.md, GenCLIP 4).

The decision is a zero-shot classification of the image among ``"a photo of a {name}."``, a fixed list of
generic industrial nouns and ``"a photo of an object."``. The name is kept when its probability reaches
the threshold or it ranks among the top k candidates.

```python
>>> result = decide_class_names(probabilities, ranks, names, mode="hard", threshold=0.2, top_k=3, generic_name="object")
>>> result.names_used, result.class_weights
```
"""

from dataclasses import dataclass

import torch

CNF_OFF, CNF_HARD, CNF_SOFT = "off", "hard", "soft"
CNF_MODES = (CNF_HARD, CNF_SOFT, CNF_OFF)


@dataclass
class ClassNameDecision:
    """Per image: what CNF saw and what the vision-enhanced branch uses.

    ``probabilities`` (B,) is the name's zero-shot probability (None when CNF is off); ``kept`` says whether
    the name passed the threshold / top-k test; ``names_used`` is the word written in the class-aware prompt
    (the generic word when a hard filter rejected the name); ``class_weights`` (B,) in [0, 1] is the share of
    the class-aware text feature in the vision-enhanced branch: 1 or 0 for "hard", the probability for
    "soft", 1 for "off".
    """

    mode: str
    names_given: list[str]
    names_used: list[str]
    kept: list[bool]
    probabilities: torch.Tensor | None
    class_weights: torch.Tensor

    def for_image(self, index: int) -> "ClassNameChoice":
        probability = None if self.probabilities is None else float(self.probabilities[index])
        return ClassNameChoice(self.mode, self.names_given[index], self.names_used[index], self.kept[index], probability,
                               float(self.class_weights[index]))


@dataclass
class ClassNameChoice:
    """One image's CNF decision (see ``ClassNameDecision``); ``probability`` is None when CNF is off."""

    mode: str
    name_given: str
    name_used: str
    kept: bool
    probability: float | None
    class_weight: float


def candidate_logits(image_embeds: torch.Tensor, name_features: torch.Tensor, generic_features: torch.Tensor,
                     duplicate_of_name: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, 1 + G) zero-shot logits: column 0 is each image's own class name, then the G generic candidates.

    ``duplicate_of_name`` (B, G) marks generic candidates that are the image's name itself; they are left
    out (logit -inf) so a name such as "fabric" does not compete with its own copy.
    """
    own = (image_embeds * name_features).sum(dim=-1, keepdim=True)
    generic = (image_embeds @ generic_features.t()).masked_fill(duplicate_of_name, float("-inf"))
    return logit_scale * torch.cat([own, generic], dim=1)


def name_probability_and_rank(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability of column 0 and its 1-based rank (1 + number of candidates scoring strictly higher)."""
    probabilities = logits.float().softmax(dim=-1)[:, 0]
    ranks = 1 + (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    return probabilities, ranks


def keeps_name(probabilities: torch.Tensor, ranks: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """(B,) bool: the name passes when its probability reaches ``threshold`` or it ranks among the top ``top_k``."""
    return (probabilities >= threshold) | (ranks <= top_k)


def decide_class_names(probabilities: torch.Tensor | None, ranks: torch.Tensor | None, names: list[str], mode: str,
                       threshold: float, top_k: int, generic_name: str) -> ClassNameDecision:
    """Keep a name if ``probability >= threshold`` or ``rank <= top_k``; "hard" replaces the others by
    ``generic_name``, "soft" keeps every name and weights it by its probability, "off" keeps all."""
    if mode == CNF_OFF:
        return ClassNameDecision(mode, list(names), list(names), [True] * len(names), None, torch.ones(len(names)))
    kept = keeps_name(probabilities, ranks, threshold, top_k).tolist()
    if mode == CNF_SOFT:
        return ClassNameDecision(mode, list(names), list(names), kept, probabilities, probabilities.clamp(0.0, 1.0))
    names_used = [name if keep else generic_name for name, keep in zip(names, kept)]
    weights = torch.tensor([1.0 if keep else 0.0 for keep in kept], device=probabilities.device)
    return ClassNameDecision(mode, list(names), names_used, kept, probabilities, weights)
