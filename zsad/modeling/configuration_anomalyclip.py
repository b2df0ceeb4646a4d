"""Configuration of AnomalyCLIP (Zhou et al., ICLR 2024; code github zqhang/AnomalyCLIP, MIT), as its authors'
``test.py`` computes it (docs/METHODS.md, "AnomalyCLIP"). Every number of their recipe is a field here."""

from .configuration_zsad_base import ZSADBaseConfig, setting
from .exceptions import ZSADError

ANOMALYCLIP_PAPER = "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection (Zhou et al., ICLR 2024)"
ANOMALYCLIP_CODE = "https://github.com/zqhang/AnomalyCLIP"
ANOMALYCLIP_LICENSE = "MIT"
LAYER_COMBINATIONS = ("mean", "sum")


class AnomalyCLIPConfig(ZSADBaseConfig):
    """AnomalyCLIP settings; defaults are the authors' (``test.sh``: features 24, 518 px, depth 9, 12 + 4 tokens)."""

    model_type = "anomalyclip"

    # The authors' recipe where it differs from the shared defaults.
    logit_scale: float = setting(1 / 0.07, "Temperature of the (normal, abnormal) softmax of maps and image (1 / 0.07).")
    image_score_map_weight: float = setting(0.0, "Image score = (1 - w) * global probability + w * max of the map; the "
                                            "authors score images by the global embedding alone.")
    position_interpolation: str = setting("bilinear", "Position embeddings resized bilinearly, as the authors' "
                                          "VisionTransformer does.")
    feature_layers: list[int] | None = setting(None, "Tapped vision blocks (default: the last, the authors' test.sh; "
                                               "[6, 12, 18, 24] is their paper's).")
    n_ctx: int = setting(12, "Learned context vectors before the state words (their Prompt_length).")
    normal_text: str = setting("object.", "Words after the normal prompt's context vectors (object-agnostic: no class name).")
    abnormal_text: str = setting("damaged object.", "Words after the abnormal prompt's context vectors.")
    deep_prompt_length: int = setting(
        4, "Learned tokens that replace token positions 1..length at the deeper text blocks (learnabel_text_embedding_length)."
    )
    deep_prompt_depth: int = setting(
        9, "Text blocks 2..depth get their own deep prompt tokens (learnabel_text_embedding_depth): depth - 1 sets."
    )
    deep_prompt_float16: bool = setting(
        True, "Round the deep prompt tokens to float16 before they enter a block, as the authors' ResidualAttentionBlock "
        "does (.half())."
    )
    context_init: str = setting(
        "a photo of a", "Untrained start only: text whose word embeddings, repeated, start the context vectors."
    )
    deep_prompt_init_std: float = setting(0.02, "Untrained start only: std of the normal draw of the deep prompt tokens.")
    init_seed: int = setting(111, "Untrained start only: seed of that draw (the authors' seed).")
    layer_combination: str = setting(
        "mean", "How the tapped layers' maps combine: 'mean' keeps the map in [0, 1]; the authors sum them ('sum', the "
        "same ranking, L times larger, clipped to 1 in the output)."
    )
    map_loss_weight: float = setting(4.0, "Training: the map losses' factor (the authors' lam = 4).")
    source_file: str | None = setting(None, "Converted checkpoints: the authors' .pth file this model was made from.")
    source_sha256: str | None = setting(None, "Converted checkpoints: sha256 of that file.")
    trained_on: str | None = setting(None, "The auxiliary dataset the prompts were trained on (e.g. VisA, MVTec AD).")
    reported_results: dict | None = setting(
        None, "Converted checkpoints of the authors' published runs: what the authors report for that run (AnomalyCLIP, "
        "Table 1), never measured by zsad."
    )
    paper: str = setting(ANOMALYCLIP_PAPER, "The method's paper.")
    source_code: str = setting(ANOMALYCLIP_CODE, "The authors' code.")
    source_license: str = setting(ANOMALYCLIP_LICENSE, "Licence of the authors' code and published weights.")

    @property
    def uses_class_names(self) -> bool:
        """Object-agnostic prompts: "object." and "damaged object." name no product."""
        return False

    def __post_init__(self, **kwargs):
        if self.feature_layers is None:
            self.feature_layers = [self.num_vision_layers]
        if self.layer_combination not in LAYER_COMBINATIONS:
            raise ZSADError(f"layer_combination must be one of {LAYER_COMBINATIONS}, got '{self.layer_combination}'.")
        if self.n_ctx < 1 or self.deep_prompt_length < 0 or self.deep_prompt_depth < 1:
            raise ZSADError("n_ctx must be at least 1, deep_prompt_length at least 0 and deep_prompt_depth at least 1.")
        if self.deep_prompt_length > self.n_ctx:
            raise ZSADError(f"deep_prompt_length ({self.deep_prompt_length}) cannot exceed n_ctx ({self.n_ctx}): the deep "
                            "tokens replace context positions.")
        super().__post_init__(**kwargs)


AnomalyCLIPConfig.register_for_auto_class()
