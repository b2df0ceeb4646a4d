"""Who computes when: one model computation at a time, a waiting single-image request before a batch's next chunk,
and, in the background between requests, the example names' prompts and ``--engine auto``'s choice."""

import functools
import threading
from contextlib import contextmanager

from zsad.detection.detector import AnomalyDetector
from zsad.modeling.prompting import clean_class_name, prompt_ensemble_features

# Images per forward pass. One: a chunk of 4 raised a batch's peak memory to +175 MB above the loaded bf16 detector,
# against +43 MB for chunks of 1 (benchmarks/bench_batch.py), and the Space's bf16 memory target has no margin left.
BATCH_CHUNK = 1


class ComputeTurns:
    """One model computation at a time, single requests first.

    The backbone's activations must fit the Space's memory once, and two passes at once on two cores would each run at
    half speed. A single request waits for the running computation only (one batch chunk at most); a
    batch's next chunk waits while a single request waits or runs.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._busy = False
        self._singles_waiting = 0

    @contextmanager
    def single(self):
        with self._condition:
            self._singles_waiting += 1
            self._condition.wait_for(lambda: not self._busy)
            self._singles_waiting -= 1
            self._busy = True
        yield from self._release_after()

    @contextmanager
    def batch_chunk(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._busy and self._singles_waiting == 0)
            self._busy = True
        yield from self._release_after()

    @property
    def singles_waiting(self) -> int:
        with self._condition:
            return self._singles_waiting

    def _release_after(self):
        try:
            yield
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()


def taking_turns(handler, turns: ComputeTurns):
    """``handler`` (a single-image request) run in its turn."""

    @functools.wraps(handler)  # Gradio reads the parameters (optional ones, the progress tracker) from the signature
    def detect(*inputs):
        with turns.single():
            return handler(*inputs)

    return detect


def warm_example_names(detector: AnomalyDetector, names: list[str], turns: ComputeTurns) -> threading.Thread:
    """Encode the example names' prompt ensembles (baseline, StackCLIP) in the background, so a first click on an
    example does not wait for them; one name per turn, at a batch chunk's priority, so a request waits for one name at
    most."""

    def warm():
        for name in dict.fromkeys(names):
            with turns.batch_chunk():
                prompt_ensemble_features(detector.backbone, [clean_class_name(name)])

    thread = threading.Thread(target=warm, name="zsad-warm-examples", daemon=True)
    thread.start()
    return thread


def choose_engine_in_background(detector: AnomalyDetector, turns: ComputeTurns) -> None:
    """With ``--engine auto``, torch serves from the first request while a background thread builds the other engines'
    graphs and times them (``MeasuredEngine.choose_in_background``; each timed forward at a batch chunk's priority), for
    every pass the page runs: each method's own, and each shared pass of "compare all methods"."""
    if not hasattr(detector.engine, "choose_in_background"):
        return  # an explicit engine: nothing to choose
    passes = [(model.config.image_size, model.vision_streams(), model.config.position_interpolation) for model in detector.models.values()]
    passes += [(size, streams, interpolation) for (size, interpolation), streams in detector.vision_passes().items()]
    detector.engine.choose_in_background(passes, turns.batch_chunk)
