"""Write the model cards of the models the Space runs by default: each method, untrained, on the default CLIP.

    python model_cards/render.py        # rewrites model_cards/<method>.md

The card templates themselves are package data (``zsad/model_cards/``), so that ``pip install zsad`` can publish;
this folder holds what they render to for the Space's models. tests/test_hub.py checks these files are current.
"""

import sys
from pathlib import Path

from zsad.hub.publish import render_model_card
from zsad.modeling.configuration_zsad_base import lineage_vv_attention_from
from zsad.runtime.methods import METHODS

FOLDER = Path(__file__).resolve().parent


def space_cards() -> dict[str, str]:
    """{file name: card text} for every registered method the Space runs untrained (not AnomalyCLIP, offered only with
    a checkpoint), at its training-free start on the default CLIP."""
    cards = {}
    for method, model_class in METHODS.items():
        if not model_class.works_untrained:
            continue
        config = model_class.config_class()
        config.vv_attention_from = lineage_vv_attention_from(config.num_vision_layers)  # what from_clip sets
        cards[f"{method}.md"] = str(render_model_card(config))
    return cards


def main() -> int:
    for name, text in space_cards().items():
        (FOLDER / name).write_text(text, encoding="utf-8")
        print(FOLDER / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
