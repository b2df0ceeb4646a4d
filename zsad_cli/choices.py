"""The command line's vocabulary that zsad itself also checks against: precisions, defaults and help texts.

A leaf: it imports nothing, so ``zsad.runtime.loading`` can read ``DEVICE_HELP`` without importing the parser, and
the parser (``zsad_cli``) calls into the commands (``zsad.cli``), never the other way round.
"""

PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
ENGINES = ("auto", "torch", "openvino", "openvino-int8", "openvino-w8a8")  # zsad.runtime.engine_choice.ENGINES
EXPORT_PRECISIONS = ("float32", "int8")
DEFAULT_QUANTILE = 1.0
DEFAULT_MARGIN = 0.01
MUTUAL_CLASS_NAME = "object"  # zsad.modeling.mutual_scoring.UNNAMED_PRODUCT: the name in --mutual results when none is given
DATASET_COLUMNS = ("image", "mask", "label", "category", "defect_type")  # zsad.data.hf.COLUMNS
DEVICE_HELP = "auto (CUDA when available, then MPS, else the CPU), cpu, cuda, cuda:N or mps"
PRECISION_HELP = ("vision backbone precision (default auto: bfloat16 where the device runs it natively, float16 on GPUs "
                  "without bfloat16, int8 vision linears on other CPUs)")
