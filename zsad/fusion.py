"""Reference fusion on the model side, in one place: a model's heads on encoded images, fused with the patch
memory of reference images of good parts when one is given (docs/METHODS.md, "Reference images").

Whole-image detection, calibration, the exported graph and few-shot evaluation all call ``scored``, so a change to
the fusion reaches each of them.
"""

from .modeling.clip_backbone import ImageFeatures
from .modeling.modeling_zsad_base import ZSADPreTrainedModel
from .references import ReferenceMemory, ReferenceScores, apply_references


def scored(model: ZSADPreTrainedModel, features: ImageFeatures, class_names: list[str], memory: ReferenceMemory | None = None,
           fusion_weight: float = 0.0):
    """(the model's output, its maps and scores fused with ``memory``'s references or None without a memory)."""
    output = model(image_features=features, class_names=class_names)
    if memory is None:
        return output, None
    return output, fused(model, features, output.anomaly_map, output.image_score, memory, fusion_weight)


def fused(model: ZSADPreTrainedModel, features: ImageFeatures, anomaly_map, image_score, memory: ReferenceMemory,
          fusion_weight: float) -> ReferenceScores:
    """``anomaly_map`` and ``image_score`` fused with the references, on the memory's layers of ``features``."""
    return apply_references(memory, features.select(memory.layers), anomaly_map, image_score, fusion_weight, model.config)
