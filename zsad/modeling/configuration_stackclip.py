"""Configuration of StackCLIP (CSP, EFA, RPL; METHODS.md "StackCLIP")."""

from .configuration_zsad_base import ZSADBaseConfig, setting
from .exceptions import ZSADError
from .stacking import SPREAD_REDUCTIONS

EFA_CLUSTER_SPECIFIC, EFA_ALL_DATA = "cluster-specific", "all-data"
EFA_TRAINING_MODES = (EFA_CLUSTER_SPECIFIC, EFA_ALL_DATA)


class StackCLIPConfig(ZSADBaseConfig):
    """StackCLIP settings; defaults are METHODS.md's ([paper], [lineage] or [choice] there)."""

    model_type = "stackclip"

    num_clusters: int | None = setting(None, "Force this many CSP clusters; None picks n* by the count criterion.")
    max_clusters: int = setting(10, "Largest count the criterion tries (bounded by the number of categories).")
    cluster_penalty: float = setting(0.1, "The 0.1 in spread + 0.1 * e^n.")
    cluster_spread: str = setting(
        "sum",
        "Form of the criterion's spread: 'sum' (per cluster, the sum of squared distances to the cluster mean, i.e. "
        "k-means inertia, which falls as clusters split) or 'mean' (their mean, the formula as summarised, which "
        "cannot pick more than two clusters on normalised features; METHODS.md).",
    )
    cluster_count_scores: dict[str, float] | None = setting(
        None,
        "The criterion's score (spread + penalty) of every candidate count, keyed by the count as a string; set by "
        "prepare_for_training (one entry when num_clusters is forced).",
    )
    kmeans_n_init: int = setting(10, "k-means restarts.")
    cluster_seed: int = setting(111, "k-means random state.")
    cluster_members: list[list[str]] | None = setting(
        None,
        "Training category names of each cluster, set by prepare_for_training (nearest to the centroid first); None "
        "before clustering, when every category is its own cluster (pure precise prompts, one set of EFA heads).",
    )
    stacked_names: list[str] | None = setting(None, "The stacked name of each cluster, cut to CLIP's token window.")
    fusion_weight: float = setting(0.5, "a in normalise(a * stacked + (1 - a) * precise); 1 gives pure stacking.")
    cluster_temperature: float = setting(0.1, "tau of the EFA weights softmax(cos(t_c, centroid_i) / tau).")
    efa_training: str = setting(
        EFA_CLUSTER_SPECIFIC,
        f"'{EFA_CLUSTER_SPECIFIC}' (a cluster's heads see only its categories' images) or '{EFA_ALL_DATA}' (every "
        "cluster's heads see every image).",
    )
    n_ctx: int = setting(12, "Learnable RPL context vectors per state.")
    ctx_init: str = setting("a photo of a", "Text whose word embeddings, repeated, start the context vectors.")
    rpl_normal_text: str = setting("object", "Words after the normal state's context vectors.")
    rpl_abnormal_text: str = setting("damaged object", "Words after the abnormal state's context vectors.")
    rpl_regularizer_weight: float = setting(1.0, "lambda of lambda * (1 - cos(learned, stacked)) per state.")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # field types first
        if self.efa_training not in EFA_TRAINING_MODES:
            raise ZSADError(f"efa_training must be one of {EFA_TRAINING_MODES}, got '{self.efa_training}'.")
        if self.cluster_spread not in SPREAD_REDUCTIONS:
            raise ZSADError(f"cluster_spread must be one of {tuple(SPREAD_REDUCTIONS)}, got '{self.cluster_spread}'.")
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ZSADError(f"num_clusters must be at least 1 (or None to choose it), got {self.num_clusters}.")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ZSADError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}.")

    @property
    def num_head_sets(self) -> int:
        """EFA head sets: one per cluster, one before clustering."""
        return max(len(self.cluster_members or []), 1)


StackCLIPConfig.register_for_auto_class()
