"""StackCLIP's Clustering-driven Stacked Prompts (METHODS.md, "StackCLIP" 1): precise class features,
k-means with the cluster-count criterion, stacked names within CLIP's token window, feature fusion.

```python
>>> features = class_prompt_features(backbone, ["bottle", "cable", "screw"])      # (3, P)
>>> clustering = cluster_categories(features.numpy(), ["bottle", "cable", "screw"])
>>> clustering.members, clustering.count_scores                                 # [['bottle', ...]], {1: ..., 2: ...}
>>> stacked_name(clustering.members[0], backbone.tokenizer, 77)                  # 'bottle cable screw'
```
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from .prompting import STATE_WORDS, TEMPLATES

logger = logging.get_logger(__name__)


def class_prompt_features(backbone, class_names: list[str], templates: tuple[str, ...] = TEMPLATES) -> torch.Tensor:
    """(C, P) precise class features: mean over templates of ``"a photo of a {c}."``-style prompts, normalised;
    each name's computed once per backbone (``frozen_features``)."""

    def compute(name: str) -> torch.Tensor:
        prompts = [template.format(name) for template in templates]
        return F.normalize(backbone.encode_text(backbone.tokenize(prompts)).float().mean(dim=0), dim=-1)

    return backbone.frozen_features_per_name(("class prompts", templates), class_names, compute)


# How a cluster's squared distances to its mean enter the count criterion (METHODS.md, StackCLIP 1):
# "sum" is k-means inertia, which falls as clusters split; "mean" is the formula as summarised, which barely does.
SPREAD_REDUCTIONS = {"sum": np.sum, "mean": np.mean}


def cluster_spread(features: np.ndarray, labels: np.ndarray, form: str = "sum") -> float:
    """sum_i reduce_{t in T_i} ||t - mean(T_i)||^2 with reduce = sum ("sum") or mean ("mean"): the within-cluster
    part of the count criterion."""
    reduce = SPREAD_REDUCTIONS[form]
    spread = 0.0
    for label in np.unique(labels):
        members = features[labels == label]
        spread += float(reduce(((members - members.mean(axis=0)) ** 2).sum(axis=1)))
    return spread


@dataclass
class Clustering:
    """Result of ``cluster_categories``: member names and centroid of each cluster, members nearest first."""

    members: list[list[str]]
    centroids: np.ndarray
    count_scores: dict[int, float]  # the criterion's score of every candidate count n


def _kmeans_labels(features: np.ndarray, count: int, n_init: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Imported here: clustering runs only when a model is prepared for training, and scikit-learn costs the
    # serving process ~80 MB of RSS and 0.7 s of start-up (benchmarks/bench_memory.py).
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=count, n_init=n_init, random_state=seed).fit(features)
    return kmeans.labels_, kmeans.cluster_centers_


def cluster_categories(
    features: np.ndarray,
    names: list[str],
    num_clusters: int | None = None,
    max_clusters: int = 10,
    penalty: float = 0.1,
    n_init: int = 10,
    seed: int = 111,
    spread: str = "sum",
) -> Clustering:
    """K-means over (C, P) class features. The count is ``num_clusters`` if given, else
    argmin_n cluster_spread(form=spread) + penalty * e^n over n in 1..min(C, max_clusters).

    Clusters are ordered by their first member in ``names``; members by distance to their centroid
    (nearest first), so a stacked name cut to the token window keeps the most typical names.
    """
    features = np.asarray(features, dtype=np.float64)
    candidates = [num_clusters] if num_clusters else range(1, min(len(names), max_clusters) + 1)
    fits, scores = {}, {}
    for count in candidates:
        fits[count] = _kmeans_labels(features, count, n_init, seed)
        scores[count] = cluster_spread(features, fits[count][0], spread) + penalty * math.exp(count)
    best = min(scores, key=scores.get)
    labels, centroids = fits[best]
    listed = ", ".join(f"n={count}: {score:.4f}" for count, score in scores.items())
    logger.info(f"StackCLIP clustering: {best} cluster(s) for {len(names)} categories; "
                f"spread ({spread}) + {penalty} e^n per candidate: {listed}.")
    order = sorted(np.unique(labels), key=lambda label: int(np.flatnonzero(labels == label)[0]))
    members = []
    for label in order:
        indices = np.flatnonzero(labels == label)
        distances = ((features[indices] - centroids[label]) ** 2).sum(axis=1)
        members.append([names[i] for i in indices[np.argsort(distances, kind="stable")]])
    return Clustering(members, centroids[order], scores)


def longest_prompt_wrapper(tokenizer) -> str:
    """The state x template prompt with the most tokens around its class name (a ``{}`` format string)."""
    wrappers = [template.format(state) for states in STATE_WORDS for state in states for template in TEMPLATES]
    lengths = tokenizer([wrapper.format("") for wrapper in wrappers], add_special_tokens=True)["input_ids"]
    return wrappers[max(range(len(wrappers)), key=lambda i: len(lengths[i]))]


def _fits(text: str, wrapper: str, tokenizer, context_length: int) -> bool:
    return len(tokenizer(wrapper.format(text), add_special_tokens=True)["input_ids"]) <= context_length


def stacked_name(members: list[str], tokenizer, context_length: int = 77) -> str:
    """Member names joined by spaces, cut so that every stacked prompt fits ``context_length`` tokens.

    Names are added in order while the longest state x template prompt still fits; a first name that is
    alone too long is cut word by word. Dropped names are logged.
    """
    wrapper = longest_prompt_wrapper(tokenizer)
    kept: list[str] = []
    for name in members:
        if not _fits(" ".join(kept + [name]), wrapper, tokenizer, context_length):
            break
        kept.append(name)
    if not kept:
        words = members[0].split()
        while words and not _fits(" ".join(words), wrapper, tokenizer, context_length):
            words.pop()
        kept = [" ".join(words)]
    if len(kept) < len(members) or kept[0] != members[0]:
        logger.warning(
            f"Stacked name cut to CLIP's {context_length}-token window: kept {kept}, dropped {members[len(kept):]}."
        )
    return " ".join(kept)


def fuse_text_features(stacked: torch.Tensor, precise: torch.Tensor, fusion_weight: float) -> torch.Tensor:
    """Multi-object fusion normalise(a * stacked_i[s] + (1 - a) * precise_c[s]) for every class and cluster.

    ``stacked`` (K, 2, P), ``precise`` (B, 2, P) -> (B, K, 2, P).
    """
    return F.normalize(fusion_weight * stacked.unsqueeze(0) + (1.0 - fusion_weight) * precise.unsqueeze(1), dim=-1)


def cluster_weights(class_features: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """EFA ensemble weights softmax_i(cos(t_c, centroid_i) / tau): (B, P), (K, P) -> (B, K), rows sum to 1."""
    similarity = F.normalize(class_features, dim=-1) @ F.normalize(centroids, dim=-1).t()
    return (similarity / temperature).softmax(dim=-1)
