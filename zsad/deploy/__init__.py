"""Exported graphs: ``export`` writes a method and fixed product names as an ONNX / OpenVINO graph (needs torch);
``runtime`` runs such a graph with ONNX Runtime or OpenVINO and returns the same ``Detection`` (no torch)."""
