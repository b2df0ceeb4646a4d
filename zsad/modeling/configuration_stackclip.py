"""Configuration of StackCLIP (CSP, EFA, RPL; METHODS.md "StackCLIP")."""

from .configuration_zsad_base import ZSADBaseConfig
from .exceptions import ZSADError
from .stacking import SPREAD_REDUCTIONS

EFA_TRAINING_MODES = ("cluster-specific", "all-data")


class StackCLIPConfig(ZSADBaseConfig):
    """StackCLIP settings; defaults are METHODS.md's ([paper], [lineage] or [choice] there).

    Args:
        num_clusters: force this many CSP clusters; ``None`` picks n* by the count criterion.
        max_clusters: largest count the criterion tries (bounded by the number of categories).
        cluster_penalty: the 0.1 in ``spread + 0.1 * e^n``.
        cluster_spread: form of the criterion's spread: "sum" (per cluster, the sum of squared distances to the
            cluster mean, i.e. k-means inertia, which falls as clusters split) or "mean" (their mean, the formula as
            summarised, which cannot pick more than two clusters on normalised features; METHODS.md).
        cluster_count_scores: the criterion's score (spread + penalty) of every candidate count, keyed by the count
            as a string; set by ``prepare_for_training`` (one entry when ``num_clusters`` is forced).
        kmeans_n_init: k-means restarts.
        cluster_seed: k-means random state.
        cluster_members: training category names of each cluster, set by ``prepare_for_training``
            (nearest to the centroid first); ``None`` before clustering, when every category is its own
            cluster (pure precise prompts, one set of EFA heads).
        stacked_names: the stacked name of each cluster, cut to CLIP's token window.
        fusion_weight: a in normalise(a * stacked + (1 - a) * precise); 1 gives pure stacking.
        cluster_temperature: tau of the EFA weights softmax(cos(t_c, centroid_i) / tau).
        efa_training: "cluster-specific" (a cluster's heads see only its categories' images) or
            "all-data" (every cluster's heads see every image).
        n_ctx: learnable RPL context vectors per state.
        ctx_init: text whose word embeddings, repeated, start the context vectors.
        rpl_normal_text / rpl_abnormal_text: words after the context vectors.
        rpl_regularizer_weight: lambda of lambda * (1 - cos(learned, stacked)) per state.
    """

    model_type = "stackclip"
    # Switches the training command offers for this method: flag -> (config field, value, help).
    training_flags = {
        "--cluster-specific": ("efa_training", "cluster-specific", "StackCLIP: a cluster's EFA heads see only its categories (default)"),
        "--all-data": ("efa_training", "all-data", "StackCLIP: every cluster's EFA heads see every training image"),
    }

    num_clusters: int | None = None
    max_clusters: int = 10
    cluster_penalty: float = 0.1
    cluster_spread: str = "sum"
    cluster_count_scores: dict[str, float] | None = None
    kmeans_n_init: int = 10
    cluster_seed: int = 111
    cluster_members: list[list[str]] | None = None
    stacked_names: list[str] | None = None
    fusion_weight: float = 0.5
    cluster_temperature: float = 0.1
    efa_training: str = "cluster-specific"
    n_ctx: int = 12
    ctx_init: str = "a photo of a"
    rpl_normal_text: str = "object"
    rpl_abnormal_text: str = "damaged object"
    rpl_regularizer_weight: float = 1.0

    def __post_init__(self, **kwargs):
        if self.efa_training not in EFA_TRAINING_MODES:
            raise ZSADError(f"efa_training must be one of {EFA_TRAINING_MODES}, got '{self.efa_training}'.")
        if self.cluster_spread not in SPREAD_REDUCTIONS:
            raise ZSADError(f"cluster_spread must be one of {tuple(SPREAD_REDUCTIONS)}, got '{self.cluster_spread}'.")
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ZSADError(f"num_clusters must be at least 1 (or None to choose it), got {self.num_clusters}.")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ZSADError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}.")
        super().__post_init__(**kwargs)

    @property
    def num_head_sets(self) -> int:
        """EFA head sets: one per cluster, one before clustering."""
        return max(len(self.cluster_members or []), 1)


StackCLIPConfig.register_for_auto_class()
