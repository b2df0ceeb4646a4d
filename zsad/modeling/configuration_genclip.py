"""Configuration of GenCLIP (METHODS.md, "GenCLIP"): every [choice]/[lineage] number is a field here."""

from .configuration_zsad_base import ZSADBaseConfig
from .exceptions import ZSADError

# Category-level nouns that compete with the user's class name in Class Name Filtering: a name the frozen
# CLIP cannot tell apart from these (e.g. "pcb1", "class_03") is not meaningful for the image.
DEFAULT_CNF_GENERIC_NOUNS = (
    "part",
    "component",
    "device",
    "tool",
    "product",
    "material",
    "surface",
    "texture",
    "fabric",
    "metal",
    "plastic",
    "wood",
    "container",
    "circuit board",
    "electronic component",
    "mechanical part",
    "fastener",
    "food",
    "pattern",
    "structure",
)
CNF_MODES = ("hard", "soft", "off")


class GenCLIPConfig(ZSADBaseConfig):
    """GenCLIP settings (defaults from METHODS.md).

    Prompts are ``[N_p x num_state_tokens][Q_p x num_query_tokens (+ V_i)][class name]`` for the normal
    state and the same with ``A_p`` for the abnormal state.

    Args:
        num_state_tokens: length of the state-specific learnable tokens N_p and A_p (4).
        num_query_tokens: length of the shared General Query Prompt Q_p (4).
        query_prompt_init: text whose word embeddings start Q_p ("a photo of a").
        normal_prompt_init / abnormal_prompt_init: text whose word embeddings start N_p / A_p. They must
            differ, or the untrained normal and abnormal prompts are identical and every map is 0.5.
            Each text's tokens are repeated (or cut) to fill the token count.
        class_name_template: how the class name ends the prompt ("{}.").
        generic_name: the class-independent word of the query-only branch and of CNF ("object").
        cnf_mode: Class Name Filtering mode: "hard" (keep or replace the name), "soft" (interpolate the
            class-aware and the generic text features by the name's probability) or "off".
        cnf_threshold: keep the name when its zero-shot probability is at least this (0.2) ...
        cnf_top_k: ... or when it ranks among the top k candidates (3).
        cnf_template: zero-shot prompt of CNF candidates ("a photo of a {}."); the generic candidate is
            written ``cnf_generic_prompt`` ("a photo of an object.").
        cnf_generic_nouns: the fixed competing candidates (DEFAULT_CNF_GENERIC_NOUNS).
        branch_weight: b in map = b * M_vision + (1 - b) * M_query (0.5).
        train_query_branch: also train on the query-only branch's focal + Dice losses. Off by default: the paper
            (Fig. 2) uses every module except CNF and F_Q in training, i.e. the vision-enhanced branch's maps only;
            the shared N_p, A_p, Q_p tokens still learn through that branch.
        image_loss_weight: weight of the image-level cross-entropy on the fused global probabilities, added to the
            focal + Dice map losses (the paper names only those; 0 leaves it out).
        optimizer: the optimizer train/train.py builds for this method ("adamw"; its learning rate 1e-3 and
            the 5 epochs are the training command's defaults).
    """

    model_type = "genclip"

    num_state_tokens: int = 4
    num_query_tokens: int = 4
    query_prompt_init: str = "a photo of a"
    normal_prompt_init: str = "flawless"
    abnormal_prompt_init: str = "damaged"
    class_name_template: str = "{}."
    generic_name: str = "object"
    cnf_mode: str = "hard"
    cnf_threshold: float = 0.2
    cnf_top_k: int = 3
    cnf_template: str = "a photo of a {}."
    cnf_generic_prompt: str = "a photo of an object."
    cnf_generic_nouns: list[str] | None = None
    branch_weight: float = 0.5
    train_query_branch: bool = False
    image_loss_weight: float = 1.0
    optimizer: str = "adamw"

    def __post_init__(self, **kwargs):
        if self.cnf_generic_nouns is None:
            self.cnf_generic_nouns = list(DEFAULT_CNF_GENERIC_NOUNS)
        self.cnf_generic_nouns = [str(noun) for noun in self.cnf_generic_nouns]
        if self.cnf_mode not in CNF_MODES:
            raise ZSADError(f"cnf_mode must be one of {CNF_MODES}, got {self.cnf_mode!r}.")
        if not 0.0 <= self.branch_weight <= 1.0:
            raise ZSADError(f"branch_weight must lie in [0, 1], got {self.branch_weight}.")
        if self.image_loss_weight < 0:
            raise ZSADError(f"image_loss_weight must be at least 0 (0 trains on the maps only), got {self.image_loss_weight}.")
        super().__post_init__(**kwargs)


GenCLIPConfig.register_for_auto_class()
