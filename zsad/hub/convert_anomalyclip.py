"""AnomalyCLIP's published prompt weights (github zqhang/AnomalyCLIP, ``checkpoints/*/epoch_15.pth``) as a zsad
checkpoint: ``zsad convert anomalyclip FILE.pth --out DIR``.

```python
>>> convert_anomalyclip("9_12_4_multiscale/epoch_15.pth", "anomalyclip-visa")   # trained on VisA, by the file's name
>>> AnomalyCLIPModel.from_pretrained("anomalyclip-visa")
```

The file is read with ``torch.load(weights_only=True)`` and checked strictly; its fixed prompt parts (the start and
end tokens' embeddings and ids) must be the given CLIP's, or it was made with another CLIP and is refused.
"""

import hashlib
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..modeling.configuration_zsad_base import DEFAULT_CLIP
from ..modeling.exceptions import ZSADError
from ..modeling.modeling_anomalyclip import AnomalyCLIPModel
from .publish import render_model_card

# The authors' two published runs (train.sh): the folder names the dataset the prompts were trained on.
TRAINED_ON_BY_FOLDER = {"9_12_4_multiscale": "VisA", "9_12_4_multiscale_visa": "MVTec AD"}
# What the authors report for each run's final file (AnomalyCLIP, Table 1), never measured here.
REPORTED_FILE = "epoch_15.pth"
REPORTED = {
    "9_12_4_multiscale": {"source": "AnomalyCLIP, Table 1", "dataset": "MVTec AD", "image_auroc": 91.5,
                          "pixel_auroc": 91.1, "aupro": 81.4},
    "9_12_4_multiscale_visa": {"source": "AnomalyCLIP, Table 1", "dataset": "VisA", "image_auroc": 82.1,
                               "pixel_auroc": 95.5, "aupro": 87.0},
}
PROMPT_KEYS = ("ctx_pos", "ctx_neg", "token_prefix_pos", "token_prefix_neg", "token_suffix_pos", "token_suffix_neg",
               "tokenized_prompts_pos", "tokenized_prompts_neg")
DEEP_PROMPT = re.compile(r"^compound_prompts_text\.(\d+)$")
UNUSED = re.compile(r"^compound_prompt_projections\.(\d+)\.(weight|bias)$")
# The file's embeddings are the backbone's own rows, copied in float32: equal up to storage rounding.
EMBEDDING_TOLERANCE = 1e-5


def convert_anomalyclip(path, out, clip: str | None = None, base_model: str | None = None, trained_on: str | None = None,
                        image_size: int = 518) -> Path:
    """Write a zsad AnomalyCLIP checkpoint made from the authors' ``{"prompt_learner": state_dict}`` file to ``out``
    (written to a temporary folder beside it, then renamed). ``clip``: the backbone (Hub id or local copy; default
    CLIP ViT-L/14@336, the authors'); ``base_model``: the Hub id of a local copy; ``trained_on``: the auxiliary
    dataset, needed when the file's folder is not one of the two published runs."""
    path, out = Path(path), Path(out)
    if out.exists():
        raise ZSADError(f"{out} already exists; choose a new --out folder (converting never overwrites).")
    trained_on = trained_on or TRAINED_ON_BY_FOLDER.get(path.parent.name)
    if not trained_on:
        raise ZSADError(f"Cannot tell what {path} was trained on: its folder '{path.parent.name}' is neither of the authors' "
                        f"runs {sorted(TRAINED_ON_BY_FOLDER)}. Say it with --trained-on NAME (e.g. 'MVTec AD').")
    state = read_prompt_learner(path)
    shapes = prompt_shapes(state)
    provenance = {"base_model_hub_id": base_model} if base_model else {}
    model = AnomalyCLIPModel.from_clip(
        clip or DEFAULT_CLIP, image_size=image_size, n_ctx=shapes["n_ctx"], deep_prompt_depth=shapes["depth"],
        deep_prompt_length=shapes["length"], source_file=path.name, source_sha256=sha256(path), trained_on=trained_on,
        reported_results=reported_results(path), is_trained=True, **provenance,
    )
    check_fixed_parts(state, model, clip or DEFAULT_CLIP)
    with torch.no_grad():
        model.prompt_context.copy_(torch.stack([state["ctx_pos"][0, 0], state["ctx_neg"][0, 0]]))
        model.deep_prompts.copy_(torch.stack([state[f"compound_prompts_text.{k}"] for k in range(shapes["depth"] - 1)]))
    save_atomically(model, out)
    return out


def reported_results(path: Path) -> dict | None:
    """The authors' reported results for their published run's final file, None for any other file."""
    return REPORTED.get(path.parent.name) if path.name == REPORTED_FILE else None


def read_prompt_learner(path: Path) -> dict[str, torch.Tensor]:
    """The file's prompt-learner state dict, loaded without running code from the file."""
    if not path.is_file():
        raise ZSADError(f"{path} is not a file; give the path of an AnomalyCLIP checkpoint such as epoch_15.pth.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ZSADError(f"{path} is not a plain tensor file: loading it would run code from it ({error}). "
                        "Only the authors' {'prompt_learner': state_dict} files are converted.") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ZSADError(f"{path} cannot be read as a PyTorch file ({error}); download it again.") from error
    if not isinstance(loaded, dict) or set(loaded) != {"prompt_learner"} or not isinstance(loaded["prompt_learner"], dict):
        found = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise ZSADError(f"{path} holds {found}, not AnomalyCLIP's {{'prompt_learner': state_dict}}.")
    state = loaded["prompt_learner"]
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ZSADError(f"{path}'s prompt_learner holds values that are not tensors.")
    return state


def prompt_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """n_ctx, depth and deep length read from the file, after checking its keys and every shape."""
    deep = sorted(int(m[1]) for key in state if (m := DEEP_PROMPT.match(key)))
    expected = set(PROMPT_KEYS) | {f"compound_prompts_text.{k}" for k in range(len(deep))}
    unused = {key for key in state if UNUSED.match(key)}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected - unused)
    if missing or extra or not deep:
        raise ZSADError(f"Not an AnomalyCLIP prompt learner: missing keys {missing or 'none'}, unexpected keys "
                        f"{extra or 'none'}{'' if deep else ', no compound_prompts_text'}.")
    context = state["ctx_pos"]
    if context.dim() != 4 or context.shape[:2] != (1, 1):
        raise ZSADError(f"ctx_pos has shape {tuple(context.shape)}; AnomalyCLIP's is (1, 1, n_ctx, width).")
    n_ctx, width = context.shape[2], context.shape[3]
    length, ids = state["compound_prompts_text.0"].shape[0], state["tokenized_prompts_pos"].shape[-1]
    wanted = {"ctx_pos": (1, 1, n_ctx, width), "ctx_neg": (1, 1, n_ctx, width), "token_prefix_pos": (1, 1, 1, width),
              "token_prefix_neg": (1, 1, 1, width), "token_suffix_pos": (1, 1, ids - 1 - n_ctx, width),
              "token_suffix_neg": (1, 1, ids - 1 - n_ctx, width), "tokenized_prompts_pos": (1, 1, ids),
              "tokenized_prompts_neg": (1, 1, ids), **{f"compound_prompts_text.{k}": (length, width) for k in deep}}
    wrong = {key: tuple(state[key].shape) for key, shape in wanted.items() if tuple(state[key].shape) != shape}
    if wrong:
        raise ZSADError(f"Wrong shapes in the prompt learner: {wrong}; expected {{key: shape}} {wanted}.")
    return {"n_ctx": n_ctx, "width": width, "length": length, "depth": len(deep) + 1}


def check_fixed_parts(state: dict[str, torch.Tensor], model: AnomalyCLIPModel, clip: str) -> None:
    """The file's start/end parts must be this CLIP's embeddings of this CLIP's tokens of the model's prompt words."""
    backbone = model.require_backbone()
    ours = model.prompt_token_ids().cpu()
    n_ctx = model.config.n_ctx
    embeddings = backbone.word_embeddings.weight.detach().float().cpu()
    for state_index, suffix in enumerate(("pos", "neg")):
        ids = state[f"tokenized_prompts_{suffix}"][0, 0].long()
        if ids.min() < 0 or ids.max() >= embeddings.shape[0]:
            raise ZSADError(f"The file's token ids reach {int(ids.max())}, outside {clip}'s vocabulary of "
                            f"{embeddings.shape[0]}: it was made with another CLIP. Convert it with that CLIP (--clip).")
        end = int(ids.argmax())  # the authors' end position: CLIP's end token has the largest id
        wanted = ours[state_index]
        our_end = int((wanted == backbone.tokenizer.eos_token_id).int().argmax())
        fixed_ids_match = end == our_end and torch.equal(ids[:1], wanted[:1]) and torch.equal(ids[1 + n_ctx:end + 1],
                                                                                              wanted[1 + n_ctx:end + 1])
        prefix_close = torch.allclose(state[f"token_prefix_{suffix}"][0, 0].float(), embeddings[ids[:1]], atol=EMBEDDING_TOLERANCE)
        suffix_close = torch.allclose(state[f"token_suffix_{suffix}"][0, 0].float(), embeddings[ids[1 + n_ctx:]],
                                      atol=EMBEDDING_TOLERANCE)
        if not (fixed_ids_match and prefix_close and suffix_close):
            text = model.config.normal_text if state_index == 0 else model.config.abnormal_text
            raise ZSADError(f"The file's fixed prompt parts ({suffix}: '[{n_ctx} context] {text}') are not {clip}'s "
                            "tokens and token embeddings: it was made with another CLIP. The authors used "
                            f"{DEFAULT_CLIP} (ViT-L/14@336); convert with the CLIP it was trained on (--clip).")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_atomically(model: AnomalyCLIPModel, out: Path) -> None:
    """``save_pretrained`` into a temporary folder beside ``out``, each file synced, then one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(scratch, model_card=str(render_model_card(model)))
        for file in scratch.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
