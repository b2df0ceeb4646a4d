"""Which model a result belongs to: ``zsad evaluate`` writes a record of the model it evaluated into evaluation.json,
and ``zsad publish --eval`` compares it with the checkpoint it publishes.

The record names the model (absolute path, Hub id or method name), its type, status and training data, and a
digest of its adapter weights (the trainable tensors; the frozen backbone is not part of a checkpoint)::

    {"name_or_path": "/runs/stackclip-mvtec/epoch-5", "model_type": "stackclip", "status": "trained",
     "training_dataset": "mvtec", "training_categories": ["bottle", ...], "adapter_digest": "sha256:9f2c..."}
"""

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..modeling.modeling_zsad_base import BACKBONE_PREFIX
from .methods import status


def adapter_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def model_digest(model) -> str:
    """The adapter digest of a loaded model (the same as ``checkpoint_digest`` of the folder it saves to)."""
    return adapter_digest({name: value for name, value in model.state_dict().items() if not name.startswith(BACKBONE_PREFIX)})


def checkpoint_digest(folder) -> str:
    """The adapter digest of a checkpoint folder's safetensors weights, read without loading the model."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return adapter_digest(tensors)


def model_reference(name_or_path: str) -> str:
    """A local path made absolute (it names the same folder from any working directory); a Hub id or method name as is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path


def model_record(model, name_or_path: str) -> dict:
    """What ``zsad evaluate`` writes as ``evaluated_model`` for ``model``, loaded from ``name_or_path``."""
    config = model.config
    return {
        "name_or_path": model_reference(name_or_path),
        "model_type": config.model_type,
        "status": status(config),
        "training_dataset": getattr(config, "training_dataset", None),
        "training_categories": getattr(config, "training_categories", None),
        "adapter_digest": model_digest(model),
    }
