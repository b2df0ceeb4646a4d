"""One image (or a batch) in, ``Detection`` out: the ``AnomalyDetector`` (``detector``), the results and their one
threshold rule (``results``, numpy only: the torch-free deploy runtime returns the same type), reference memories
(``references``), calibrated product profiles (``profile``, ``calibration``, ``conformal`` thresholds with a stated
false-alarm rate, ``profile_card`` the profile's README), fusion of model and reference maps
(``fusion``), full-resolution windows (``tiling``), mutual scoring of unlabeled batches (``mutual``) and overlays
and figures (``visualize``).

This ``__init__`` imports nothing, so ``zsad.detection.results`` loads without torch; ``zsad.AnomalyDetector`` is the
public name of the detector.
"""
