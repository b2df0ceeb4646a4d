"""``--engine auto|torch|openvino|openvino-int8|openvino-w8a8``: which engine runs the vision pass, ``auto`` chosen by
measuring.

``auto`` times a few forwards of each engine this machine can run on the first pass of each (input size, streams,
interpolation), keeps the fastest, and records the choice in the engine cache (``zsad.runtime.engine.engine_cache_dir``), keyed
by this machine (CPU model and flags, torch threads) and the graphs' fingerprints (backbone, precision, pass), so the
next start reads it instead of measuring. The engines are torch and OpenVINO in the backbone's precision, and, when
the precision itself was chosen by ``--precision auto`` (``Runtime.precision_chosen``), OpenVINO with int8 weights
(``openvino-int8``) and with int8 weights and activations (``openvino-w8a8``), both computing the rest in the
backbone's precision. A candidate whose tapped tokens are not within ``FIDELITY_FLOOR`` of torch's on the same
photo-like image is left out, so auto never trades the answer for speed. An explicit engine or precision is always
the one that runs.

A command (``zsad predict``, ``evaluate``, ``calibrate``) chooses before its first image, so one run has one engine. A
server (the Space) calls ``choose_in_background``: torch serves while a background thread builds the graphs and times
them, and each pass switches to its chosen engine when that is known (every result names the route that made it).
"""

import hashlib
import json
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from zsad_cli.choices import ENGINES

from ..modeling.clip_backbone import CLIPBackbone
from ..modeling.exceptions import ZSADError
from ..modeling.precision import cpu_may_have_int8_dot_products
from .atomic import fsync
from .engine import OpenVINOEngine, TorchEngine, calibration_pixels, engine_cache_dir, openvino_unsupported, stream_key, widest_first
from .provenance import vision_precision

# Timed forwards per candidate after one untimed warm-up (which builds or reads the OpenVINO graph).
MEASURED_FORWARDS = 3
CHOICE_FORMAT = 3
# The least Pearson correlation, over every tapped token and the global embedding, that a candidate's vision pass must
# have with torch's on the measured image. On the full-size ViT-L/14 with random weights every OpenVINO route keeps
# the maps within Pearson 0.9997 of torch float32 (docs/PERFORMANCE.md): the floor catches a quantisation that real
# weights' outlier activations break, which random weights cannot show.
FIDELITY_FLOOR = 0.999
# The measured image: photo-like, not one the int8 activations were calibrated on.
MEASURED_IMAGE_SEED = 1
TORCH_MEANWHILE = {"engine": "torch", "seconds": {}}  # what a pass runs on while the background thread chooses it
# Peak memory of compiling and first running one OpenVINO graph, per byte of the vision tower's float32 weights (1.22 GB
# for ViT-L/14): 2.4 GB for a float32 graph, 1.45 GB for a bfloat16 one (float16 weights on disk); auto leaves OpenVINO
# out of a pass when the machine has less than this available.
GRAPH_PEAK_MEMORY_FACTOR = 2.3


def vision_engine(backbone: CLIPBackbone, engine: str | None = None, cache_dir: str | Path | None = None,
                  quantised: bool = False):
    """The engine named ``engine`` (default: ``$ZSAD_ENGINE``, else "auto") for ``backbone``; ``quantised``: auto may
    choose OpenVINO's int8 graphs (the precision was chosen by auto, ``Runtime.precision_chosen``)."""
    name = engine or os.environ.get("ZSAD_ENGINE") or "auto"
    if name not in ENGINES:
        raise ZSADError(f"engine must be one of {ENGINES}, got '{name}'.")
    if name == "torch":
        return TorchEngine(backbone)
    if name.startswith("openvino"):
        return OpenVINOEngine(backbone, cache_dir, name)
    return MeasuredEngine(backbone, cache_dir, quantised)


def candidate_openvino_engines(backbone: CLIPBackbone, quantised: bool) -> tuple[str, ...]:
    """The OpenVINO engines auto measures: the graph in the backbone's precision, and its int8 graphs when the precision
    was chosen by auto (``quantised``); an int8 backbone's int8 linears quantise their inputs already, so int8
    activations are its own precision's route. ``openvino-w8a8`` only where the CPU may have int8 dot products: on
    AVX2's multiply-adds it lost to torch int8 (9.2 s against 6.7 s per image, docs/PERFORMANCE.md) after a
    3-minute build."""
    w8a8 = ("openvino-w8a8",) if cpu_may_have_int8_dot_products() else ()
    if quantised:
        return ("openvino", "openvino-int8", *w8a8)
    return ("openvino", *w8a8) if vision_precision(backbone) == "int8" else ("openvino",)


def machine_identity() -> dict:
    """The CPU's model name and a digest of its feature flags (Linux: /proc/cpuinfo), and torch's thread count."""
    fields: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    return {"cpu": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16], "threads": torch.get_num_threads(),
            "system": platform.system()}


class MeasuredEngine:
    """``auto``: per vision pass, the fastest of the engines this machine can run, measured on first use or read from
    the recorded choice. Thread-safe: one choice at a time, the chosen engines are themselves thread-safe."""

    name = "auto"

    def __init__(self, backbone: CLIPBackbone, cache_dir: str | Path | None = None, quantised: bool = False):
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir else engine_cache_dir()
        self.candidates = {"torch": TorchEngine(backbone)}
        reasons = {}
        for name in candidate_openvino_engines(backbone, quantised):
            reasons[name] = openvino_unsupported(backbone, name)
            if reasons[name] is None:
                self.candidates[name] = OpenVINOEngine(backbone, self.cache_dir, name)
        self.unavailable = next(iter(reasons.values()))  # why plain OpenVINO is not a candidate (None: it is)
        self.choices: dict = {}  # (size, streams, interpolation) -> {"engine": name, "seconds": {name: s}}
        self._lock = threading.Lock()
        self._pending: dict | None = None  # background mode: passes queued, not chosen yet -> their arguments
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._turn: Callable[[], AbstractContextManager] = nullcontext

    def encode_streams(self, pixel_values: torch.Tensor, layers_by_start: dict, position_interpolation: str) -> dict:
        self.backbone.check_streams(pixel_values, layers_by_start, position_interpolation)
        choice = self.choice(pixel_values.shape[-1], layers_by_start, position_interpolation)
        return self.candidates[choice["engine"]].encode_streams(pixel_values, layers_by_start, position_interpolation)

    def choice(self, size: int, layers_by_start: dict, position_interpolation: str) -> dict:
        """The engine for this pass: measured once per machine and graph fingerprint, then read from disk."""
        key = (size, stream_key(layers_by_start), position_interpolation)
        with self._lock:
            if key not in self.choices and self._pending is not None:
                self._enqueue(key, (size, layers_by_start, position_interpolation))
                return TORCH_MEANWHILE
            if key not in self.choices:
                self.choices[key] = self._recorded_or_measured(size, layers_by_start, position_interpolation)
                self._release_all_but(self._chosen())
            return self.choices[key]

    def choose_in_background(self, passes: Iterable[tuple[int, dict, str]] = (),
                             turn: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """From now on a pass not chosen yet runs on torch while a background thread chooses it: ``passes`` ((size,
        streams, interpolation)) first, then any pass first seen later. The OpenVINO graph is built (or read) outside
        ``turn()``; each timed forward runs inside it (a server's turn on the model), so a request waits for one forward
        at most and the timings are not shared with requests."""
        with self._lock:
            if self._pending is None:
                self._pending, self._turn = {}, turn
                threading.Thread(target=self._choose_queued, name="zsad-engine-choice", daemon=True).start()
            for size, layers_by_start, position_interpolation in widest_first(list(passes)):
                key = (size, stream_key(layers_by_start), position_interpolation)
                if key not in self.choices:
                    self._enqueue(key, (size, layers_by_start, position_interpolation))

    def _enqueue(self, key: tuple, arguments: tuple) -> None:
        if key not in self._pending:
            self._pending[key] = arguments
            self._queue.put(key)

    def _choose_queued(self) -> None:
        while True:
            key = self._queue.get()
            size, layers_by_start, position_interpolation = self._pending[key]
            try:
                choice = self._recorded_or_measured(size, layers_by_start, position_interpolation)
            except (ZSADError, RuntimeError, OSError) as error:
                warnings.warn(f"auto could not measure the vision engines, torch serves: {error}", RuntimeWarning, stacklevel=1)
                choice = {"engine": "torch", "seconds": {}}
            with self._lock:
                self.choices[key] = choice
                del self._pending[key]
                self._release_all_but(self._chosen())

    def route(self, size: int, layers_by_start: dict, position_interpolation: str) -> str:
        """The chosen engine's route for this pass (measured now when it has not been chosen yet)."""
        return self.candidates[self.choice(size, layers_by_start, position_interpolation)["engine"]].describe()

    def describe(self) -> str:
        """E.g. "auto: openvino bfloat16, int8 weights (measured per image: torch 0.41 s, openvino 0.30 s, openvino-int8 0.26 s)"."""
        if len(self.candidates) == 1:
            return f"auto: {self.candidates['torch'].describe()} (only candidate: {self.unavailable})"
        with self._lock:
            chosen = [describe_choice(self.candidates[choice["engine"]], choice) for choice in self.choices.values()]
            if self._pending:
                chosen.append(f"auto: {self.candidates['torch'].describe()} while {len(self._pending)} vision pass(es) are "
                              "measured in the background")
        return "; ".join(dict.fromkeys(chosen)) or "auto (measured on the first image)"

    def _release_all_but(self, keep: set) -> None:
        """Free the compiled graphs of the OpenVINO candidates not in ``keep`` (measuring compiled them)."""
        for name, engine in self.candidates.items():
            if name not in keep and hasattr(engine, "release"):
                engine.release()

    def _chosen(self) -> set:
        return {choice["engine"] for choice in self.choices.values()}

    def _recorded_or_measured(self, size: int, layers_by_start: dict, position_interpolation: str) -> dict:
        if len(self.candidates) == 1:
            return {"engine": "torch", "seconds": {}}
        short_of_memory = memory_shortfall(self.backbone)
        if short_of_memory:
            return {"engine": "torch", "seconds": {}, "note": short_of_memory}  # not recorded: memory may be free next time
        record = self.cache_dir / "choices" / f"{self._choice_key(size, layers_by_start, position_interpolation)}.json"
        recorded = read_choice(record, self.candidates)
        if recorded is not None:
            return recorded
        choice = self._measure(size, layers_by_start, position_interpolation)
        write_choice(record, choice)
        return choice

    def _choice_key(self, size: int, layers_by_start: dict, position_interpolation: str) -> str:
        graphs = {name: engine.fingerprint(size, layers_by_start) for name, engine in self.candidates.items() if name != "torch"}
        identity = json.dumps({"format": CHOICE_FORMAT, "machine": machine_identity(), "graphs": graphs,
                               "position_interpolation": position_interpolation}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def _measure(self, size: int, layers_by_start: dict, position_interpolation: str) -> dict:
        """Median seconds of ``MEASURED_FORWARDS`` forwards of one image per candidate; a candidate that fails, or
        whose features are not within ``FIDELITY_FLOOR`` of torch's, is left out with a warning (torch, today's route,
        always stays)."""
        pixels = calibration_pixels(self.backbone, size, 1, seed=MEASURED_IMAGE_SEED)
        seconds, left_out, reference = {}, {}, None
        for name, engine in self.candidates.items():  # torch first: the reference the others are checked against
            def forward(engine=engine):
                return engine.encode_streams(pixels, layers_by_start, position_interpolation)

            try:
                engine.prepare(size, layers_by_start, position_interpolation)
                timed, features = median_seconds(forward, self._turn)
            except (ZSADError, RuntimeError, OSError) as error:
                if name == "torch":
                    raise
                warnings.warn(f"The {name} engine was left out of the measurement: {error}", RuntimeWarning, stacklevel=2)
                continue
            reference = features if reference is None else reference
            agreement = features_pearson(features, reference)
            if agreement < FIDELITY_FLOOR:
                left_out[name] = f"its features at Pearson {agreement:.5f} to torch's, below {FIDELITY_FLOOR}"
                warnings.warn(f"The {name} engine was left out: {left_out[name]}", RuntimeWarning, stacklevel=2)
            else:
                seconds[name] = timed
            self._release_all_but({min(seconds, key=seconds.get)} | self._chosen())  # the fastest so far stays compiled
        return {"engine": min(seconds, key=seconds.get), "seconds": seconds, **({"left_out": left_out} if left_out else {})}


def features_pearson(features: dict, reference: dict) -> float:
    """Pearson correlation of every tapped token and the global embedding of two ``encode_streams`` results."""
    def flat(streams: dict) -> torch.Tensor:
        return torch.cat([tensor.float().ravel() for feature in streams.values()
                          for tensor in (*feature.layer_tokens, feature.image_embeds)])

    return torch.corrcoef(torch.stack([flat(features), flat(reference)]))[0, 1].item()


def median_seconds(forward, turn: Callable[[], AbstractContextManager] = nullcontext) -> tuple[float, object]:
    """(the median of ``MEASURED_FORWARDS`` timed ``forward()`` after a warm-up (first-call allocations), each in its
    own ``turn()``; the warm-up's output)."""
    with turn():
        output = forward()
    times = []
    for _ in range(MEASURED_FORWARDS):
        with turn():
            started = time.perf_counter()
            forward()
            times.append(time.perf_counter() - started)
    return statistics.median(times), output


def describe_choice(engine, choice: dict) -> str:
    if "note" in choice:
        return f"auto: {engine.describe()} ({choice['note']})"
    measured = ", ".join(f"{name} {seconds:.3g} s" for name, seconds in choice["seconds"].items())
    left_out = "".join(f"; {name} left out: {why}" for name, why in choice.get("left_out", {}).items())
    return f"auto: {engine.describe()} (measured per image: {measured}{left_out})"


def available_memory_bytes() -> int | None:
    """What the kernel says can be allocated without swapping (Linux's MemAvailable); None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_shortfall(backbone: CLIPBackbone) -> str | None:
    """Why OpenVINO is left out of a pass for lack of memory (None: it fits, or the machine does not say)."""
    available = available_memory_bytes()
    weights = sum(parameter.numel() for parameter in backbone.model.vision_model.parameters()) * 4
    needed = GRAPH_PEAK_MEMORY_FACTOR * weights
    if available is None or available >= needed:
        return None
    return (f"openvino left out: compiling its graph needs about {needed / 2**30:.1f} GiB of memory, "
            f"{available / 2**30:.1f} GiB is available")


def read_choice(path: Path, candidates: dict) -> dict | None:
    """A recorded choice, or None when it is missing, unreadable or names an engine not available now."""
    try:
        record = json.loads(path.read_text())
        seconds = {str(name): float(value) for name, value in record["seconds"].items()}
        left_out = {str(name): str(why) for name, why in record.get("left_out", {}).items()}
        if record["engine"] not in candidates or record["engine"] not in seconds:
            return None
        return {"engine": record["engine"], "seconds": seconds, **({"left_out": left_out} if left_out else {})}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_choice(path: Path, choice: dict) -> None:
    """Write the choice atomically (temporary file, fsync, rename): concurrent writers leave one whole record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump({**choice, "machine": machine_identity()}, handle, indent=1, sort_keys=True)
        fsync(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
