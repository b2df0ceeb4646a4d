"""Settings every zsad model shares: the backbone it runs on, input size, tapped layers, map post-processing."""

from transformers import PreTrainedConfig

from .clip_backbone import quarter_point_layers

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


class ZSADBaseConfig(PreTrainedConfig):
    """Base of the method configs. Backbone dimensions are read from the backbone by ``from_clip``.

    Args:
        base_model_name_or_path: Hub id or local path of the frozen CLIP the adapters were trained on.
        base_model_revision: Hub revision (branch, tag or commit) of that backbone.
        image_size: square input side in pixels; position embeddings are interpolated to it.
        feature_layers: 1-based vision blocks whose outputs are tapped (default: the quarter points).
        num_vision_layers: depth of the backbone's vision transformer.
        patch_size: the backbone's patch side in pixels.
        vision_hidden_size: width of the backbone's vision transformer (input of the patch adapters).
        text_hidden_size: width of the backbone's text transformer (size of prompt token embeddings).
        projection_dim: size of CLIP's joint image-text space.
        logit_scale: temperature of the (normal, abnormal) softmax.
        smoothing_sigma: Gaussian smoothing of the final map in pixels at ``smoothing_reference_size``;
            scaled with ``image_size``.
        smoothing_reference_size: input size at which ``smoothing_sigma`` is given.
        image_score_map_weight: image score = (1 - w) * global probability + w * max of the map.
        is_trained: False for a training-free model made by ``from_clip``.
    """

    base_model_name_or_path: str = DEFAULT_CLIP
    base_model_revision: str | None = None
    image_size: int = 518
    feature_layers: list[int] | None = None
    num_vision_layers: int = 24
    patch_size: int = 14
    vision_hidden_size: int = 1024
    text_hidden_size: int = 768
    projection_dim: int = 768
    logit_scale: float = 100.0
    smoothing_sigma: float = 4.0
    smoothing_reference_size: int = 518
    image_score_map_weight: float = 0.5
    is_trained: bool = False

    def __post_init__(self, **kwargs):
        if self.feature_layers is None:
            self.feature_layers = quarter_point_layers(self.num_vision_layers)
        self.feature_layers = [int(layer) for layer in self.feature_layers]
        super().__post_init__(**kwargs)
