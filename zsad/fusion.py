"""Reference fusion on the model side, in one place: a model's heads on encoded images, fused with the patch
memory of reference images of good parts when one is given (docs/METHODS.md, "Reference images").

Whole-image detection, calibration, the exported graph and few-shot evaluation all call ``scored``, so a change to
the fusion reaches each of them.
"""

from .modeling.clip_backbone import ImageFeatures
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .references import FusionScale, ReferenceMemory, ReferenceScores, apply_references


def scored(model: ZSADPreTrainedModel, features: ImageFeatures, class_names: list[str], memory: ReferenceMemory | None = None,
           scale: FusionScale | None = None):
    """(the model's output, its maps and scores fused with ``memory``'s references on ``scale``, or None without a
    memory)."""
    output = model(image_features=features, class_names=class_names)
    if memory is None:
        return output, None
    return output, fused(model, features, output.anomaly_map, output.global_score, memory, scale)


def fused(model: ZSADPreTrainedModel, features: ImageFeatures, anomaly_map, global_score, memory: ReferenceMemory,
          scale: FusionScale) -> ReferenceScores:
    """``anomaly_map`` fused with the reference map on ``scale`` (each standardised by the good images' scores), on the
    memory's layers and value-value stream of ``features``; the image score from the fused map and ``global_score``."""
    features = features.select(memory.layers, memory.vv_attention_from, memory.position_interpolation)
    return apply_references(memory, features, anomaly_map, global_score, scale, model.config)
