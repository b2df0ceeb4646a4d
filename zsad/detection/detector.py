"""From a user's image and product name to a score, a verdict, a map at the image's own size and an overlay.

One frozen CLIP backbone is loaded once and shared by every method model the detector holds:

```python
>>> from zsad.detection.detector import AnomalyDetector
>>> detector = AnomalyDetector.load(checkpoints={"stackclip": "user/zsad-stackclip"})  # others untrained
>>> result = detector.detect("part.png", "metal nut", method="stackclip", threshold=0.5)
>>> result.score, result.verdict, result.anomaly_map.shape   # (H, W) of part.png
>>> result.overlay.save("part_overlay.png")
>>> results = detector.compare("part.png", "metal nut")      # every method on the same image
>>> lot = detector.detect_mutual(["lot/001.png", "lot/002.png", "lot/003.png"], "metal nut")  # against each other
>>> profile = detector.build_profile("stackclip", "metal nut", "good_parts/")   # reference images, calibration
>>> detector.detect("part.png", "metal nut", method="stackclip", profile=profile).summary()["calibration"]
'calibrated on 8 good images'
```
"""

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image

from ..modeling.class_names import product_name
from ..modeling.clip_backbone import CLIPBackbone, ImageFeatures
from ..modeling.exceptions import ZSADError
from ..modeling.image_processing_zsad import DEFAULT_THRESHOLD, ZSADImageProcessor, check_threshold, resize_map
from ..modeling.modeling_zsad_base import ZSADPreTrainedModel
from ..runtime.engine import TorchEngine, model_features, model_route, widest_first
from ..runtime.engine_choice import vision_engine
from ..runtime.errors import BackboneLoadError
from ..runtime.images import LoadedImage, read_image
from ..runtime.loading import Runtime, checkpoint_method, load_method, shared_backbone
from ..runtime.methods import METHODS, status
from ..runtime.provenance import provenance
from . import calibration, mutual, tiling
from .fusion import scored
from .profile import DEFAULT_MARGIN, DEFAULT_QUANTILE, ProductProfile
from .results import Detection, build_detection, check_optional_threshold, thresholds
from .tiling import tile_boxes

# Detection, the threshold helpers and tile_boxes are public here too (``from zsad.detection.detector import Detection``).
__all__ = ["DEFAULT_THRESHOLD", "AnomalyDetector", "BackboneLoadError", "Detection", "check_optional_threshold", "check_threshold",
           "resize_map", "thresholds", "tile_boxes"]


class AnomalyDetector:
    """Holds one shared backbone and any number of method models by name; does pre- and post-processing."""

    def __init__(self, backbone: CLIPBackbone, models: Mapping[str, ZSADPreTrainedModel] | None = None, engine=None):
        self.backbone = backbone
        # What runs the vision pass (``zsad.runtime.engine``): torch unless an engine is given (``load`` picks one by name).
        self.engine = engine or TorchEngine(backbone)
        self.models: dict[str, ZSADPreTrainedModel] = {}
        for name, model in (models or {}).items():
            self.add(name, model)

    @classmethod
    def load(
        cls,
        methods: Sequence[str] | None = None,
        checkpoints: Mapping[str, str | None] | None = None,
        clip: str | CLIPBackbone | None = None,
        precision: str = "auto",
        image_size: int | None = None,
        device: str | torch.device | None = "auto",
        runtime: Runtime | None = None,
        engine: str | None = None,
    ) -> "AnomalyDetector":
        """Load the backbone once, then every method: from its checkpoint (path or Hub id) where one is
        given, else untrained on the backbone. ``methods`` defaults to all of ``zsad.METHODS``.

        Without ``clip``, the backbone is the one the first checkpoint was trained on (or the default CLIP).
        ``image_size`` overrides the input size of untrained models only (checkpoints keep theirs).
        ``device`` ("auto": the first CUDA GPU, then MPS, else the CPU) and ``precision`` ("auto", "float32",
        "bfloat16", "float16", "int8") say where the backbone and every model run and in which precision, decided by
        ``zsad.runtime.loading.Runtime.resolve`` as on every other surface (``runtime``: an already resolved one). A ready
        ``CLIPBackbone`` passed as ``clip`` keeps its own. ``engine`` runs the vision pass: "torch", "openvino" (a graph
        cached on disk, ``zsad.runtime.engine``) or "auto" (the faster of them here, measured on first use:
        ``zsad.runtime.engine_choice``); default ``$ZSAD_ENGINE``, else "auto".
        """
        checkpoints = {name: path for name, path in (checkpoints or {}).items() if path}
        unknown = sorted(set(checkpoints) - set(METHODS))
        if unknown:
            raise ZSADError(f"Checkpoints were given for unknown methods {unknown}; known methods: {sorted(METHODS)}.")
        runtime = runtime or Runtime.resolve(device, precision)
        backbone = shared_backbone(clip, checkpoints.values(), runtime)
        quantised = runtime.precision_chosen and not isinstance(clip, CLIPBackbone)  # a ready backbone keeps its precision
        detector = cls(backbone, engine=vision_engine(backbone, engine, quantised=quantised))
        for name in methods or list(METHODS):
            detector.add(name, load_method(name, checkpoints.get(name), backbone, image_size))
        return detector

    @classmethod
    def for_model(
        cls, model: str, clip: str | CLIPBackbone | None = None, precision: str = "auto", image_size: int | None = None,
        device: str | torch.device | None = "auto", runtime: Runtime | None = None, engine: str | None = None,
    ) -> "AnomalyDetector":
        """A detector holding one model: a method name (untrained) or a checkpoint's path / Hub id."""
        if model in METHODS:
            return cls.load(methods=[model], clip=clip, precision=precision, image_size=image_size, device=device, runtime=runtime,
                            engine=engine)
        if image_size:
            raise ZSADError("An image size can be set only for untrained models; a checkpoint keeps the size it was trained at.")
        method = checkpoint_method(model)
        return cls.load(methods=[method], checkpoints={method: model}, clip=clip, precision=precision, device=device, runtime=runtime,
                        engine=engine)

    def add(self, name: str, model: ZSADPreTrainedModel) -> None:
        """Hold ``model`` under ``name``; it must run on this detector's backbone."""
        if model.clip is not self.backbone:
            model.attach_backbone(self.backbone)
        self.models[name] = model.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def method_names(self) -> list[str]:
        return list(self.models)

    def status(self, method: str) -> str:
        return status(self.model(method))

    def verdict_thresholds(self, class_name: str, threshold: float | None = None, profile: ProductProfile | None = None) -> tuple[float, float, str]:
        """(image threshold, pixel threshold, where they come from): ``threshold``, else the profile's, else 0.5."""
        return thresholds(threshold, profile.calibration if profile else None)

    def names_the_product(self, methods: str | Sequence[str] | None = None) -> bool:
        """Whether the prompts of ``methods`` (default: every held one) name the product (``config.uses_class_names``),
        so that a class name must be given."""
        methods = [methods] if isinstance(methods, str) else methods or self.method_names
        return any(self.model(method).config.uses_class_names for method in methods)

    def product_name(self, class_name: str | None, methods: str | Sequence[str] | None = None) -> str:
        """``class_name`` as the prompts of ``methods`` (default: every held one) use it. It may be empty or None when
        none of them names the product (e.g. AnomalyCLIP): then ``UNNAMED_PRODUCT``."""
        return product_name(class_name, required=self.names_the_product(methods))

    def provenance(self, method: str, class_name_given: str | None, class_name_used: str | None,
                   threshold_rule: tuple[float, float, str] | None) -> dict:
        """The provenance block (``zsad.runtime.provenance.provenance``) of results of ``method`` for that product name
        and rule; its vision engine is the route this detector runs the method's pass on (``auto`` decides it now)."""
        return provenance(self.model(method), class_name_given=class_name_given, class_name_used=class_name_used,
                          threshold_rule=threshold_rule, vision_engine=model_route(self.engine, self.model(method)))

    def model(self, method: str) -> ZSADPreTrainedModel:
        if not isinstance(method, str) or method not in self.models:
            raise ZSADError(f"Unknown method '{method}'; this detector holds {self.method_names}.")
        return self.models[method]

    def detect(self, image, class_name: str, method: str | None = None, threshold: float | None = None,
               profile: ProductProfile | None = None, display_side: int | None = None) -> Detection:
        """Score one image (path, bytes, PIL image or array) of a product called ``class_name``.

        ``profile`` (from ``build_profile`` or ``ProductProfile.load``) adds its reference images and, unless a
        ``threshold`` is given, its calibrated thresholds; without either the threshold is 0.5. With ``display_side``,
        the image is read with its longest side at most that many pixels (large JPEGs are decoded at reduced size) and
        the map, mask and overlay come at that size: the model sees its input size either way, and camera-size images
        cost about what small ones do.
        """
        return self.detect_batch([image], class_name, method=method, threshold=threshold, profile=profile,
                                 display_side=display_side)[0]

    def detect_tiled(self, image, class_name: str, method: str | None = None, threshold: float | None = None,
                     overlap: float = 0.25, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                     profile: ProductProfile | None = None) -> Detection:
        """``image`` at full resolution in overlapping windows of the model's input size, each fused with ``profile``'s
        references when given: ``zsad.detection.tiling.detect_tiled``."""
        return tiling.detect_tiled(self, image, class_name, method, threshold, overlap, batch_size, progress, profile)

    def detect_mutual(self, images: Sequence, class_name: str, method: str = "baseline", **options) -> list[Detection]:
        """Score ``images`` (N >= 2 of one product) against each other, no text or references needed; one Detection
        per image: ``zsad.detection.mutual.detect_mutual`` (``options``: threshold, profile, settings, batch_size,
        display_side, progress)."""
        return mutual.detect_mutual(self, images, class_name, method=method, **options)

    def compare(self, image, class_name: str, threshold: float | Mapping[str, float | None] | None = None,
                profiles: Mapping[str, ProductProfile] | None = None, display_side: int | None = None) -> dict[str, Detection]:
        """Every held method on the same image: read once, one vision pass per input size (with every layer any
        of those methods taps), passed to each model as ``image_features``; ``threshold`` one for every method or by
        method name (a method left out: None), ``profiles`` by method name, ``display_side`` as in ``detect``."""
        started = time.perf_counter()
        loaded = read_image(image, max_side=display_side)
        picture = loaded.image
        by_method = threshold if isinstance(threshold, Mapping) else dict.fromkeys(self.models, threshold)
        for chosen in by_method.values():
            check_optional_threshold(chosen)
        name = self.product_name(class_name)
        shared = {key: self.encode([picture], key, streams) for key, streams in self.vision_passes().items()}
        shared_seconds = time.perf_counter() - started
        results = {}
        for method, model in self.models.items():
            features = model.features_from_streams(shared[model.config.vision_pass])
            results[method] = self._detect_on_features(method, features, [loaded], [name], by_method.get(method),
                                                       time.perf_counter(), (profiles or {}).get(method))[0]
        # The shared reading and vision pass are counted once, with the first method.
        first = next(iter(results.values()))
        first.seconds += shared_seconds
        return results

    def encode(self, pictures: list[Image.Image], vision_pass: tuple[int, str],
               streams: dict[int | None, list[int]]) -> dict[int | None, ImageFeatures]:
        """One vision pass over ``pictures`` at ``vision_pass`` (input size, position interpolation): {value-value
        start (None: the stock tokens): features at the layers ``streams`` names for it}."""
        size, position_interpolation = vision_pass
        return self.engine.encode_streams(self.image_processor(size).pixel_values(pictures), streams, position_interpolation)

    def model_features(self, model: ZSADPreTrainedModel, pictures: list[Image.Image]) -> ImageFeatures:
        """One vision pass over ``pictures`` for ``model`` alone: its streams, then its features out of them."""
        return model_features(self.engine, model, self.image_processor(model.config.image_size).pixel_values(pictures))

    def image_processor(self, size: int) -> ZSADImageProcessor:
        """The pre- and post-processing of this detector's models at input ``size``."""
        return ZSADImageProcessor(size, self.backbone.image_mean, self.backbone.image_std)

    def vision_passes(self, methods: Sequence[str] | None = None) -> dict[tuple[int, str], dict[int | None, list[int]]]:
        """{(input size, position interpolation): {vv_attention_from: every layer the ``methods`` (default: all held)
        of that pass read from that stream}}: one vision pass per input size and interpolation, one stream per start;
        the passes tapping most layers first (an OpenVINO graph built for one serves the narrower ones after it)."""
        layers: dict[tuple, dict] = {}
        for method in methods or self.method_names:
            model = self.model(method)
            for start, tapped in model.vision_streams().items():
                layers.setdefault(model.config.vision_pass, {}).setdefault(start, set()).update(tapped)
        passes = [(key, {start: sorted(tapped) for start, tapped in streams.items()}) for key, streams in layers.items()]
        return dict(widest_first(passes))

    def detect_batch(
        self, images: Sequence, class_names: str | Sequence[str], method: str | None = None, threshold: float | None = None,
        profile: ProductProfile | None = None, display_side: int | None = None,
    ) -> list[Detection]:
        """One forward pass for a batch of images; ``class_names`` is one name for all or one per image.

        ``method`` may be left out when the detector holds a single model; ``display_side`` as in ``detect``.
        """
        started = time.perf_counter()
        method = self.resolve_method(method)
        model = self.model(method)
        check_optional_threshold(threshold)
        loaded = [read_image(image, max_side=display_side) for image in images]
        pictures = [item.image for item in loaded]
        if not pictures:
            raise ZSADError("No images were given.")
        names = list(class_names) if isinstance(class_names, (list, tuple)) else [class_names] * len(pictures)
        if len(names) != len(pictures):
            raise ZSADError(f"Got {len(names)} class names for {len(pictures)} images; pass one name per image or one for all.")
        names = [self.product_name(name, method) for name in names]
        features = self.model_features(model, pictures)
        return self._detect_on_features(method, features, loaded, names, threshold, started, profile)

    def run_heads(self, method: str, features: ImageFeatures, names: list[str], profile: ProductProfile | None = None):
        """The model's heads on an encoded batch, fused with the profile's references when one is given: (the model's
        output, what the verdict reads: the fused scores or that output)."""
        model = self.model(method)
        for name in sorted(set(names)) if profile else ():
            profile.check_compatible(method, name, model.config)
        with torch.inference_mode():
            output, fused = scored(model, features, names, profile.memory if profile else None, profile.fusion if profile else None)
        return output, fused or output

    def _detect_on_features(self, method: str, features, loaded: list[LoadedImage], names: list[str], threshold: float | None,
                            started: float, profile: ProductProfile | None = None) -> list[Detection]:
        """``run_heads`` on an encoded batch, then one Detection per image."""
        output, result = self.run_heads(method, features, names, profile)
        model_maps = result.anomaly_map.float().cpu().numpy()
        scores = result.image_score.float().cpu().tolist()
        chosen = self.verdict_thresholds(names[0], threshold, profile)
        seconds = (time.perf_counter() - started) / len(loaded)
        return [
            build_detection(
                method=method, status=status(self.model(method)), class_name=names[i], score=scores[i], picture=loaded[i].image,
                thresholds=chosen, model_map=model_maps[i], details=output.image_details(i), seconds=seconds,
                references=profile.num_references if profile else 0,
                note=profile.mismatch_note(float(result.mean_distance[i])) if result is not output else None,
                original_size=loaded[i].original_size,
            )
            for i in range(len(loaded))
        ]

    # ----- product profiles: zsad.detection.calibration -------------------------------------------------------------

    def build_profile(self, method: str | None, class_name: str, normal_images, defective_images=None, masks=None, *,
                      quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN, fusion_weight: float | None = None,
                      false_alarm_rate: float | None = None, allow_higher_rate: bool = False, batch_size: int = 8,
                      progress: bool = False) -> ProductProfile:
        """A product profile (reference images and calibrated thresholds): ``zsad.detection.calibration.build_profile``."""
        return calibration.build_profile(self, method, class_name, normal_images, defective_images, masks, quantile=quantile,
                                         margin=margin, fusion_weight=fusion_weight, false_alarm_rate=false_alarm_rate,
                                         allow_higher_rate=allow_higher_rate, batch_size=batch_size, progress=progress)

    def build_profiles(self, methods: Sequence[str], class_name: str, normal_images, defective_images=None, masks=None, *,
                       quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN,
                       fusion_weight: float | None = None, false_alarm_rate: float | None = None, allow_higher_rate: bool = False,
                       batch_size: int = 8, progress: bool = False) -> dict[str, ProductProfile]:
        """Profiles of several methods, each image encoded once per input size: ``zsad.detection.calibration.build_profiles``."""
        return calibration.build_profiles(self, methods, class_name, normal_images, defective_images, masks, quantile=quantile,
                                          margin=margin, fusion_weight=fusion_weight, false_alarm_rate=false_alarm_rate,
                                          allow_higher_rate=allow_higher_rate, batch_size=batch_size, progress=progress)

    def add_references(self, profile: ProductProfile, normal_images, *, false_alarm_rate: float | None = None,
                       allow_higher_rate: bool | None = None, batch_size: int = 8, progress: bool = False) -> ProductProfile:
        """``profile`` recalibrated with more good images: ``zsad.detection.calibration.add_references``."""
        return calibration.add_references(self, profile, normal_images, false_alarm_rate=false_alarm_rate,
                                          allow_higher_rate=allow_higher_rate, batch_size=batch_size, progress=progress)

    def resolve_method(self, method: str | None) -> str:
        if method is not None:
            return method
        if len(self.models) != 1:
            raise ZSADError(f"Say which method to use; this detector holds {self.method_names}.")
        return self.method_names[0]


