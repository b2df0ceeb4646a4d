"""Configuration of GenCLIP (METHODS.md, "GenCLIP"): every [choice]/[lineage] number is a field here."""

from .class_name_filter import CNF_HARD, CNF_MODES, CNF_OFF, CNF_SOFT
from .configuration_zsad_base import ZSADBaseConfig, setting
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


IMAGE_LOSS_BRANCHES = ("vision", "fused")

class GenCLIPConfig(ZSADBaseConfig):
    """GenCLIP settings (defaults from METHODS.md).

    Prompts are ``[N_p x num_state_tokens][Q_p x num_query_tokens (+ V_i)][class name]`` for the normal
    state and the same with ``A_p`` for the abnormal state.
    """

    model_type = "genclip"

    num_state_tokens: int = setting(4, "Length of the state-specific learnable tokens N_p and A_p.")
    num_query_tokens: int = setting(4, "Length of the shared General Query Prompt Q_p.")
    query_prompt_init: str = setting("a photo of a", "Text whose word embeddings start Q_p.")
    normal_prompt_init: str = setting(
        "flawless",
        "Text whose word embeddings start N_p (tokens repeated or cut to fill the count). It must differ from "
        "abnormal_prompt_init, or the untrained normal and abnormal prompts are identical and every map is 0.5.",
    )
    abnormal_prompt_init: str = setting("damaged", "Text whose word embeddings start A_p (see normal_prompt_init).")
    class_name_template: str = setting("{}.", "How the class name ends the prompt.")
    generic_name: str = setting("object", "The class-independent word of the query-only branch and of CNF.")
    cnf_mode: str = setting(
        CNF_HARD,
        f"Class Name Filtering mode: '{CNF_HARD}' (keep or replace the name), '{CNF_SOFT}' (interpolate the "
        f"class-aware and the generic text features by the name's probability) or '{CNF_OFF}'.",
    )
    cnf_threshold: float = setting(0.2, "CNF keeps the name when its zero-shot probability is at least this ...")
    cnf_top_k: int = setting(3, "... or when it ranks among the top k candidates.")
    cnf_template: str = setting("a photo of a {}.", "Zero-shot prompt of the CNF candidates.")
    cnf_generic_prompt: str = setting("a photo of an object.", "The generic CNF candidate's prompt.")
    cnf_generic_nouns: list[str] | None = setting(None, "The fixed competing CNF candidates (DEFAULT_CNF_GENERIC_NOUNS).")
    branch_weight: float = setting(0.5, "b in map = b * M_vision + (1 - b) * M_query.")
    train_query_branch: bool = setting(
        False,
        "Also train on the query-only branch's focal + Dice losses. Off by default: the paper (Fig. 2) uses every module "
        "except CNF and F_Q in training, i.e. the vision-enhanced branch's maps only; the shared N_p, A_p, Q_p tokens "
        "still learn through that branch.",
    )
    image_loss_weight: float = setting(
        1.0,
        "Weight of the image-level cross-entropy (on image_loss_branch's global probabilities), added to the focal + "
        "Dice map losses (the paper names only those; 0 leaves it out).",
    )
    image_loss_branch: str = setting(
        "vision",
        "Global probabilities the image cross-entropy is taken on: 'vision' (the vision-enhanced branch's, so the "
        "query-only branch's features F_Q stay out of training as in the paper's Fig. 2) or 'fused' "
        "(b * vision + (1 - b) * query, which trains F_Q too; the behaviour before issue 19).",
    )
    optimizer: str = setting(
        "adamw", "The optimizer train/train.py builds for this method (its learning rate 1e-3 and the 5 epochs are the "
        "training command's defaults).",
    )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # field types first
        if self.cnf_generic_nouns is None:
            self.cnf_generic_nouns = list(DEFAULT_CNF_GENERIC_NOUNS)
        self.cnf_generic_nouns = [str(noun) for noun in self.cnf_generic_nouns]
        if self.cnf_mode not in CNF_MODES:
            raise ZSADError(f"cnf_mode must be one of {CNF_MODES}, got {self.cnf_mode!r}.")
        if not 0.0 <= self.branch_weight <= 1.0:
            raise ZSADError(f"branch_weight must lie in [0, 1], got {self.branch_weight}.")
        if self.image_loss_branch not in IMAGE_LOSS_BRANCHES:
            raise ZSADError(f"image_loss_branch must be one of {IMAGE_LOSS_BRANCHES}, got {self.image_loss_branch!r}.")
        if self.image_loss_weight < 0:
            raise ZSADError(f"image_loss_weight must be at least 0 (0 trains on the maps only), got {self.image_loss_weight}.")


GenCLIPConfig.register_for_auto_class()
