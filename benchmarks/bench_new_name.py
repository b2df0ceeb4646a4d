"""What the first request with a new product name waits for: its state x template prompt ensemble (issue 14,
item 4), on the full-size random CLIP ViT-L/14@336 text tower.

Rows: today's encoding (all 420 prompts padded to the longest, float32), each lever alone, and the levers
combined; seconds for one new name, and the cosine of the (normal, abnormal) ensemble features to today's.
Then how many templates the mean needs for cosine >= 0.999 (random weights: indicative only).

    python benchmarks/bench_new_name.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_new_name.py
"""

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_class_line, emulated_isa, full_size_inputs, machine_line, timed

from zsad.modeling.clip_backbone import CLIPBackbone
from zsad.modeling.precision import quantize_text_linears, resolve_precision
from zsad.modeling.prompting import NORMAL_STATES, STATE_WORDS, TEMPLATES, TEXT_TOKENS_PER_CHUNK, prompt_ensemble_features

NAME = "metal nut"  # the name whose features are compared
# Each timed encoding takes the next of these, so every one meets prompt lengths (tensor shapes) it has not seen,
# as a new product name does: the kernels' per-shape caches do not flatter the figures.
TIMED_NAMES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "pill", "screw", "tile", "toothbrush",
               "transistor", "wood", "zipper", "candle", "cashew", "chewing gum", "fryum", "macaroni", "pipe fryum")
FIDELITY = 0.999


def all_prompts(name: str = NAME, templates=TEMPLATES) -> list[str]:
    return [template.format(state.format(name)) for states in STATE_WORDS for state in states for template in templates]


def todays_prompt_features(backbone: CLIPBackbone, name: str = NAME) -> torch.Tensor:
    """The encoding before this benchmark's levers: every prompt padded to the longest, fixed-size chunks."""
    ids = backbone.tokenize(all_prompts(name))
    rows_per_chunk = max(1, TEXT_TOKENS_PER_CHUNK // ids.shape[1])
    return torch.cat([backbone.encode_text(chunk) for chunk in ids.split(rows_per_chunk)])


def ensemble(prompt_features: torch.Tensor, num_templates: int) -> torch.Tensor:
    """(2, P) normalised state means over the first ``num_templates`` templates."""
    per_state = prompt_features.float().unflatten(0, (-1, len(TEMPLATES)))[:, :num_templates]
    normal, abnormal = per_state.split([len(NORMAL_STATES), per_state.shape[0] - len(NORMAL_STATES)])
    return F.normalize(torch.stack([normal.mean(dim=(0, 1)), abnormal.mean(dim=(0, 1))]), dim=-1)


def new_name_features(backbone: CLIPBackbone, templates=TEMPLATES, name: str = NAME) -> torch.Tensor:
    """What a request with a name the backbone has not seen computes (the cache emptied first)."""
    backbone._frozen_features.clear()
    return prompt_ensemble_features(backbone, [name], templates)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lower of the normal and abnormal features' cosines."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsad-bench"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(cpu_class_line())
    print(machine_line())
    clip_path, _ = full_size_inputs(Path(args.workdir))
    backbone = CLIPBackbone.from_pretrained(clip_path)
    native_bf16 = resolve_precision("auto") == torch.bfloat16 and not emulated_isa()

    names = itertools.cycle(TIMED_NAMES)

    def measure(encode):
        """(median seconds over fresh names after one warm-up, the features of NAME)."""
        return timed(lambda: encode(next(names)), repeats=args.repeats, warmup=1), encode(NAME)

    today_seconds, today_prompts = measure(lambda name: todays_prompt_features(backbone, name))
    today = ensemble(today_prompts, len(TEMPLATES))
    rows = [("today: 420 prompts padded to the longest, float32", today_seconds, 1.0)]
    seconds, features = measure(lambda name: new_name_features(backbone, name=name))
    rows.append(("prefix trees, float32 (the default text precision before)", seconds, cosine(features, today)))
    if native_bf16:
        bf16 = CLIPBackbone.from_pretrained(clip_path, dtype=torch.bfloat16).set_text_dtype(torch.bfloat16)
        seconds, features = measure(lambda name: new_name_features(bf16, name=name))
        rows.append(("prefix trees + bfloat16 text tower", seconds, cosine(features, today)))
    int8 = quantize_text_linears(CLIPBackbone.from_pretrained(clip_path))
    seconds, features = measure(lambda name: new_name_features(int8, name=name))
    rows.append(("prefix trees + int8 text linears", seconds, cosine(features, today)))

    needed = next(k for k in range(1, len(TEMPLATES) + 1) if cosine(ensemble(today_prompts, k), today) >= FIDELITY)
    fast = bf16 if native_bf16 else int8
    seconds, features = measure(lambda name: new_name_features(fast, TEMPLATES[:needed], name))
    rows.append((f"combined, {needed} of {len(TEMPLATES)} templates (opt-in only)", seconds, cosine(features, today)))

    print(f"\nfirst request with a new name ({len(all_prompts())} prompts; a different name each time, median of {args.repeats} "
          f"after 1 warm-up; cosine on '{NAME}')")
    print(f"{'route':<62} {'seconds':>8} {'x today':>8} {'cosine':>9}")
    for label, seconds, similarity in rows:
        print(f"{label:<62} {seconds:8.2f} {today_seconds / seconds:8.1f} {similarity:9.5f}")
    print("\ntemplates (first k of TEMPLATES) -> cosine of the float32 ensemble to all 35 (random weights: indicative)")
    for k in (1, 2, 4, 8, 12, 16, 24, len(TEMPLATES)):
        print(f"  {k:>2}: {cosine(ensemble(today_prompts, k), today):.5f}")


if __name__ == "__main__":
    main()
