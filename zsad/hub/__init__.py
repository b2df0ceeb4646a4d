"""Checkpoints to and from the outside: publishing to the Hugging Face Hub (``publish``: the folder a checkpoint is
uploaded as, with adapter weights, config, remote code and the rendered model card, in one commit) and the authors'
published AnomalyCLIP weights converted into a checkpoint (``convert_anomalyclip``)."""
