"""The transformers pipeline saved with every zsad checkpoint, so the checkpoint runs from its folder or Hub repo
without zsad installed (``trust_remote_code=True``):

```python
>>> from transformers import pipeline
>>> detector = pipeline(model="org/zsad-stackclip", trust_remote_code=True)
>>> result = detector("part.png", class_name="metal nut")              # a path, URL, PIL image or array
>>> result["score"], result["verdict"]                                  # 0.73, "anomalous"
>>> result["mask"]                                                      # PIL "L" image at part.png's size
>>> result["anomaly_map"]                                               # (H, W) float32 numpy map in [0, 1]
>>> detector(["a.png", "b.png"], class_name="metal nut", threshold=0.4)  # a list gives one dict per image
>>> detector(["lot/1.png", "lot/2.png", "lot/3.png"], mutual=True)         # scored against each other (MuSc)
>>> pipeline(model="org/zsad-stackclip", trust_remote_code=True, precision="float32")  # default "auto"
```

``precision`` means what it means on every zsad surface (``precision.resolve_precision``, the one rule): "auto" is
bfloat16 on a CPU with native bfloat16 and on newer CUDA GPUs, float16 on older ones and MPS, int8 vision linears on
other CPUs; the backbone is then loaded as ``zsad.AnomalyDetector.load`` loads it, so both give the same scores.

``save_pretrained`` of every zsad model writes ``custom_pipelines`` into config.json and copies this file (and the
files it imports) next to the model code; that is how ``pipeline()`` finds it (transformers' ``PIPELINE_REGISTRY``
convention, the same entry ``Pipeline.save_pretrained`` writes).

Images are read, resized and thresholded by ``image_processing_zsad`` (the code zsad's own ``AnomalyDetector``
uses), so a pipeline result equals ``AnomalyDetector.detect`` on the same image.

Extension point, per-call parameters: ``_sanitize_parameters`` is the one place that accepts them and routes each to
``preprocess`` / ``_forward`` / ``postprocess``; anything else is refused with the list of accepted names. ``mutual``
is taken by ``__call__``: it makes the call one batch (``score_mutually``) instead of images one by one. A product
profile (zsad's reference images and calibration) will arrive as a ``profile=`` parameter routed there; the
pipeline takes none until profiles are saved in a form this file can read without zsad.
"""

from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image as fetch_image
from transformers.pipelines import PIPELINE_REGISTRY

from .class_names import product_name
from .exceptions import ZSADError
from .image_processing_zsad import DEFAULT_THRESHOLD, check_threshold, load_image, mask_image, verdict
from .mutual_scoring import UNNAMED_PRODUCT, MutualSettings, content_key, default_text_weight, score_batch
from .precision import INT8, load_backbone_in, resolve_precision, text_on_the_fast_route

TASK = "zero-shot-anomaly-detection"
PARAMETERS = ("class_name", "threshold", "mutual")


class ZeroShotAnomalyDetectionPipeline(Pipeline):
    """``pipe(images, class_name=..., threshold=0.5)`` -> per image ``{"score", "verdict", "threshold", "class_name",
    "mask", "anomaly_map"}``: the image score in [0, 1], "anomalous" when it reaches the threshold (else "normal"),
    the pixel mask ``anomaly_map >= threshold`` as a black/white PIL image and the map as an (H, W) float32 array,
    both at the input image's own size. ``class_name`` (the product's name) is required, except with ``mutual=True``
    for a model that is not trained: a list of images of one product is then scored against each other
    (``mutual_scoring.score_batch``; no text, no references needed), each dict with ``compared_with`` (how many other
    images it was compared with) and ``note`` (None, or why the score says little) added.

    ``precision`` ("auto", "float32", "bfloat16", "float16", "int8") puts the model's backbone in that precision on
    the pipeline's device (a model passed in gets a backbone read in that precision; the one it had is not changed)."""

    # The model carries its own tokenizer and image statistics (its CLIP backbone); nothing else is loaded.
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, precision: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.serve_in(resolve_precision(precision, self.device))

    def serve_in(self, dtype) -> None:
        """The model's backbone in ``dtype`` as ``zsad.runtime.loading.runtime_backbone`` makes it. A backbone already
        in ``dtype`` is kept; otherwise it is read again from the checkpoint's backbone (and int8 linears made from its
        float32 weights), never converted in place: a backbone may be shared with other models, and reading in
        bfloat16 rounds the weights before CLIP's quick-GELU fold while converting rounds after it (scores move by
        more than 1e-6)."""
        backbone = self.model.require_backbone()
        if dtype != INT8 and backbone.dtype == dtype:
            text_on_the_fast_route(backbone, dtype)
            return
        reread = load_backbone_in(*self.model.config.backbone_source(), dtype)
        self.model.attach_backbone(text_on_the_fast_route(reread, dtype).to(self.device))

    def __call__(self, inputs, *args, mutual: bool = False, **kwargs):
        if mutual:
            return self.score_mutually(inputs, **kwargs)
        return super().__call__(inputs, *args, **kwargs)

    def score_mutually(self, images, class_name: str | None = None, threshold: float = DEFAULT_THRESHOLD, **unknown) -> list[dict]:
        """``images`` (a list of at least two of one product) scored against each other, one dict per image."""
        if unknown:
            raise ZSADError(f"Unknown argument(s) {sorted(unknown)}; this pipeline takes {', '.join(PARAMETERS)}.")
        if not isinstance(images, (list, tuple)):
            raise ZSADError("mutual=True scores images against each other: pass a list of at least two images of the product.")
        check_threshold(threshold)
        trained = bool(self.model.config.is_trained)
        if class_name is None and trained and self.model.config.uses_class_names:
            raise ZSADError("Pass the product's name: pipe(images, class_name='metal nut', mutual=True); this model is trained, "
                            "so its text map is part of the mutual scores.")
        name = UNNAMED_PRODUCT if class_name is None else product_name(class_name, self.model.config.uses_class_names)
        pictures = [self.read(image) for image in images]
        settings = MutualSettings()
        batch = score_batch(self.model, pictures, [content_key(picture) for picture in pictures], name,
                            default_text_weight(settings, trained), settings)
        return [{**self.postprocess({"anomaly_map": batch.maps[i], "score": batch.scores[i], "class_name": name,
                                     "size": picture.size}, float(threshold)),
                 "compared_with": int(batch.compared[i]), "note": batch.notes[i]} for i, picture in enumerate(pictures)]

    @staticmethod
    def read(image):
        """A path, URL, PIL image or array as an upright RGB PIL image."""
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = fetch_image(image)
        return load_image(image)

    def _sanitize_parameters(self, class_name=None, threshold=None, **unknown):
        if unknown:
            raise ZSADError(f"Unknown argument(s) {sorted(unknown)}; this pipeline takes {', '.join(PARAMETERS)}.")
        preprocess_params, postprocess_params = {}, {}
        if class_name is not None:
            preprocess_params["class_name"] = product_name(class_name, self.model.config.uses_class_names)
        if threshold is not None:
            check_threshold(threshold)
            postprocess_params["threshold"] = float(threshold)
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image, class_name=None):
        if class_name is None and self.model.config.uses_class_names:
            raise ZSADError("Pass the product's name: pipe(image, class_name='metal nut').")
        class_name = class_name or UNNAMED_PRODUCT  # a model whose prompts name no product (AnomalyCLIP)
        picture = self.read(image)
        pixel_values = self.model.image_processor.pixel_values([picture])
        return {"pixel_values": pixel_values, "class_name": class_name, "size": picture.size}

    def _forward(self, inputs):
        output = self.model(inputs["pixel_values"], class_names=[inputs["class_name"]])
        return {"anomaly_map": output.anomaly_map[0], "score": output.image_score[0], "class_name": inputs["class_name"],
                "size": inputs["size"]}

    def postprocess(self, outputs, threshold=DEFAULT_THRESHOLD):
        anomaly_map, mask = self.model.image_processor.postprocess(outputs["anomaly_map"].float().cpu(), outputs["size"], threshold)
        score = float(outputs["score"])
        return {
            "score": score,
            "verdict": verdict(score, threshold),
            "threshold": threshold,
            "class_name": outputs["class_name"],
            "mask": mask_image(mask),
            "anomaly_map": anomaly_map,
        }


# Remote code may import this file twice (once for the pipeline, once through the model code); the first copy registers.
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ZeroShotAnomalyDetectionPipeline, pt_model=AutoModel, type="image")


def custom_pipelines() -> dict:
    """The ``custom_pipelines`` entry of a checkpoint's config.json, as ``Pipeline.save_pretrained`` writes it from the
    registration above (the class as "module.Class" of the file saved next to the model code)."""
    registered = PIPELINE_REGISTRY.supported_tasks[TASK]
    implementation = f"{__name__.split('.')[-1]}.{ZeroShotAnomalyDetectionPipeline.__name__}"
    return {TASK: {**registered, "impl": implementation, "pt": [model.__name__ for model in registered["pt"]]}}
