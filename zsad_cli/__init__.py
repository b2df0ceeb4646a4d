"""The ``zsad`` command's entry point: ``zsad predict | calibrate | export | evaluate | publish | dataset push | tiny-clip``.

This package builds and checks the command line before anything heavy is imported: ``zsad --help``, every
subcommand's ``--help`` and argument errors answer without torch, transformers or gradio. It sits outside the
``zsad`` package on purpose: ``import zsad`` registers the models with ``AutoConfig`` / ``AutoModel``, which needs
torch and transformers (seconds), and any ``zsad.*`` import runs that first. Only a parsed command imports
``zsad.cli.commands``, whose commands import what they use (``--engine onnx|openvino`` runs without torch).

The vocabulary zsad checks against too (precisions, defaults) is in ``zsad_cli.choices``, a leaf that imports nothing;
the defaults repeated from ``zsad.detection.profile`` and ``zsad.data.hf`` are checked by tests/test_cli.py.
"""

import argparse
import os

from .choices import (
    DATASET_COLUMNS,
    DEFAULT_MARGIN,
    DEFAULT_QUANTILE,
    DEVICE_HELP,
    ENGINES,
    EXPORT_PRECISIONS,
    MUTUAL_CLASS_NAME,
    PRECISION_HELP,
    PRECISIONS,
)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (env ``ZSAD_DEVICE``, default auto); ``zsad.runtime.loading.Runtime.resolve`` resolves it."""
    parser.add_argument("--device", default=os.environ.get("ZSAD_DEVICE", "auto"),
                        help=f"where the model runs (env ZSAD_DEVICE, default auto): {DEVICE_HELP}")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` (default auto), the same for every command that runs a model."""
    add_device_argument(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)


def add_engine_argument(parser: argparse.ArgumentParser, exported: bool = False) -> None:
    """``--engine`` (env ``ZSAD_ENGINE``, default auto): what runs the vision pass (``zsad.runtime.engine_choice``); with
    ``exported``, onnx|openvino also run a folder written by ``zsad export``."""
    choices = ENGINES + (("onnx",) if exported else ())
    parser.add_argument("--engine", choices=choices, default=os.environ.get("ZSAD_ENGINE", "auto"),
                        help="what runs the vision pass (env ZSAD_ENGINE, default auto: the fastest of torch and openvino here, "
                             "and with --precision auto also openvino-int8 and openvino-w8a8, measured on first use and "
                             "remembered); torch; openvino (a graph built once and cached next to the Hugging Face cache); "
                             "openvino-int8 (the same with int8 weights); openvino-w8a8 (int8 weights and activations)"
                             + ("; with --model a folder written by `zsad export`, onnx|openvino run that exported graph"
                                if exported else ""))


def add_rescore_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rescore", action="store_true",
                        help="with --mutual: re-score each image by the scores of its nearest images in its group, by global "
                             "embedding (MuSc's RsCIN, windows 1, 2, 3)")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation options, shared by ``zsad evaluate`` and ``train/evaluate.py``."""
    parser.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    parser.add_argument("--dataset", required=True,
                        help="mvtec, visa, mpdd, btad, sdd, dagm, dtd, meta (meta.json), folder, "
                             "hf:ORG/NAME[:split] (a Hub dataset) or hf-disk:PATH (a folder written by save_to_disk)")
    parser.add_argument("--root", help="dataset root folder (not for hf: / hf-disk: datasets)")
    parser.add_argument("--normal-dirs", nargs="+", default=(), metavar="NAME",
                        help="folder layout: more names of normal-image folders (besides good, ok, normal, nominal, pass)")
    for role in DATASET_COLUMNS:
        parser.add_argument(f"--{role.replace('_', '-')}-column", metavar="NAME",
                            help=f"hf: / hf-disk: datasets: the column holding the {role.replace('_', ' ')} (default '{role}')")
    parser.add_argument("--out", "--output-dir", dest="out", required=True,
                        help="folder for evaluation.json, evaluation.md and evaluation.png")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    parser.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    parser.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    add_runtime_arguments(parser)
    add_engine_argument(parser)
    parser.add_argument("--shots", type=int, default=0,
                        help="few-shot: K reference images per category from its train/good split, next to the zero-shot numbers "
                             "(default 0: zero-shot only)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="with --shots: draws of the K references (seeds 0..N-1); mean and std (default 3)")
    parser.add_argument("--tiles", action="store_true",
                        help="score each image at full resolution in overlapping windows of the input size (small defects)")
    parser.add_argument("--mutual", action="store_true",
                        help="score each category's test images against each other, unlabeled, in groups of at most 16 (zsad.detection.mutual; "
                             "a trained method's text map is fused in, an untrained one's is left out)")
    add_rescore_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="Zero-shot industrial anomaly detection with CLIP.")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true",
                         help="show the libraries' own progress bars and warnings (off by default: nothing there to act on)")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-clip", parents=[verbose], help="write a tiny random CLIP for offline tests and UI work")
    tiny.add_argument("directory", help="folder to write the model, tokenizer and image processor to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(command_name="tiny_clip")

    predict = commands.add_parser("predict", parents=[verbose], help="anomaly scores, overlays and masks for image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    predict.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained), a checkpoint folder / Hub id, "
                         "or with --engine onnx|openvino a folder written by `zsad export`")
    predict.add_argument("--class-name", help="what the product is, e.g. 'metal nut' (an exported graph's only name by default; "
                         "optional for a method whose prompts name no product (AnomalyCLIP); "
                         f"optional with --mutual for an untrained method without --profile/--reference: its text map is not "
                         f"used, and the results name the product '{MUTUAL_CLASS_NAME}')")
    add_engine_argument(predict, exported=True)
    predict.add_argument("--out", required=True, help="folder for <image>_overlay.png, <image>_mask.png and scores.json")
    predict.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    predict.add_argument("--threshold", type=float,
                         help="for the masks and the verdicts (default: a profile's calibrated thresholds, an exported graph's own, else 0.5)")
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    predict.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    predict.add_argument("--profile", metavar="DIR", help="a product profile from `zsad calibrate` (references and thresholds)")
    predict.add_argument("--reference", nargs="+", metavar="GOOD", help="images or folders of good parts: a profile built on the fly")
    add_runtime_arguments(predict)
    predict.add_argument("--display-side", type=int, metavar="PIXELS",
                         help="write overlays and masks with their longest side at most PIXELS (default: each image's full size)")
    predict.add_argument("--tiles", action="store_true",
                         help="score each image at full resolution in overlapping windows of the model's input size "
                         "(small defects on large images; one pass per window)")
    predict.add_argument("--mutual", action="store_true",
                         help="score the images against each other, no text or references needed (zsad.detection.mutual): the images, "
                         "at least 2 of one product, are split into groups of at most 16 by their files' bytes, each scored and "
                         "written on its own (memory stays that of one group; processes under accelerate launch share whole "
                         "groups); a trained method's text map is fused in; not with --tiles or --engine onnx|openvino")
    add_rescore_argument(predict)
    predict.add_argument("--resume", action="store_true", help="keep the images already done in --out (records-*.jsonl), do the rest "
                         "(with --mutual: the groups not yet finished)")
    predict.set_defaults(command_name="predict")

    calibrate = commands.add_parser("calibrate", parents=[verbose],
                                                 help="a product profile: reference images of good parts and calibrated thresholds")
    calibrate.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    calibrate.add_argument("--class-name", help="what the product is, e.g. 'metal nut' (needed with --normal; --add reads the profile's)")
    good = calibrate.add_mutually_exclusive_group(required=True)
    good.add_argument("--normal", nargs="+", metavar="GOOD", help="images or folders of good parts (the references)")
    good.add_argument("--add", nargs="+", metavar="MORE_GOOD",
                      help="images or folders of more good parts for the profile at --out: memory, leave-one-out scores and "
                           "thresholds recalibrated on all its references (the same as calibrating on all of them)")
    calibrate.add_argument("--defective", nargs="+", metavar="BAD", help="images or folders of defective parts (F1-optimal thresholds)")
    calibrate.add_argument("--masks", metavar="DIR", help="folder of defect masks named like the defective images (000.png or 000_mask.png)")
    calibrate.add_argument("--out", required=True, help="folder for the profile (profile.json, memory.safetensors)")
    calibrate.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                           help=f"good images only: thresholds at this quantile of the good scores (default {DEFAULT_QUANTILE}: the maximum)")
    calibrate.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help=f"added to that quantile (default {DEFAULT_MARGIN})")
    calibrate.add_argument("--false-alarm-rate", type=float, metavar="ALPHA",
                           help="thresholds that flag at most this share of good parts (split-conformal on the leave-one-out "
                                "scores, e.g. 0.05: at most 1 in 20; needs at least 1/ALPHA - 1 good images); with --add, "
                                "replaces the profile's rule")
    calibrate.add_argument("--allow-higher-rate", action="store_true",
                           help="with too few good images for --false-alarm-rate, use the best they reach, 1 in (n + 1), and say so")
    calibrate.add_argument("--fusion-weight", type=float, default=None,
                           help="share of the reference map in the fused map (both on the good images' scale); default: "
                                "chosen on the defective images when given, else 1 untrained, 0.5 trained")
    calibrate.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    calibrate.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    add_runtime_arguments(calibrate)
    add_engine_argument(calibrate)
    calibrate.set_defaults(command_name="calibrate")

    export = commands.add_parser("export", parents=[verbose],
                                           help="one method and fixed product names as an ONNX / OpenVINO graph that runs without torch")
    export.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    export.add_argument("--class-name", action="append", help="a product name the graph scores (repeat for several; default: the profile's product)")
    export.add_argument("--format", required=True, choices=["onnx", "openvino"], help="the graph format: ONNX (ONNX Runtime) or OpenVINO IR")
    export.add_argument("--precision", default="float32", choices=EXPORT_PRECISIONS,
                        help="float32 (default), or int8: the vision transformer's linear layers with int8 weights")
    export.add_argument("--out", required=True, help="folder for the graph and zsad_deploy.json")
    export.add_argument("--profile", help="a product profile folder (`zsad calibrate`): its reference images go into the graph for its product, "
                                          "with its calibrated thresholds")
    export.add_argument("--threshold", type=float, help="the verdict/mask threshold stored with the graph (default: a profile's calibrated "
                                                        "thresholds for its product, else 0.5)")
    export.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    export.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    export.set_defaults(command_name="export")

    evaluate = commands.add_parser("evaluate", parents=[verbose],
                                               help="per-category and mean metrics of a model on a benchmark (JSON, Markdown, figure)")
    add_evaluation_arguments(evaluate)
    evaluate.set_defaults(command_name="evaluate")

    publish = commands.add_parser("publish", parents=[verbose], help="upload a checkpoint (weights, config, code, model card) in one Hub commit")
    publish.add_argument("checkpoint", help="checkpoint folder written by save_pretrained or training")
    publish.add_argument("--repo-id", required=True, help="Hub repo, ORG/NAME")
    publish.add_argument("--eval", help="evaluation JSON from `zsad evaluate`; fills the card's model-index")
    publish.add_argument("--token", help="Hub token (default: the logged-in one)")
    publish.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    publish.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded to DIR instead, and list it")
    publish.add_argument("--base-model", metavar="HUB_ID",
                         help="the Hub id the checkpoint's local backbone copy was downloaded from (needed when its config "
                         "knows the backbone only as a local path); checked against that id's config on the Hub")
    publish.add_argument("--tiny-backbone-for-tests", action="store_true",
                         help="publish a checkpoint built on the tiny random CLIP, for tests of publishing only; its card "
                         "then says its scores are noise (without it such a checkpoint is refused)")
    publish.set_defaults(command_name="publish")

    convert = commands.add_parser("convert", help="a published model of another code base as a zsad checkpoint")
    sources = convert.add_subparsers(dest="source", required=True)
    anomalyclip = sources.add_parser("anomalyclip", parents=[verbose], help="AnomalyCLIP's prompt weights (github zqhang/AnomalyCLIP, "
                                     "checkpoints/*/epoch_15.pth)")
    anomalyclip.add_argument("file", help="the authors' {'prompt_learner': state_dict} .pth file")
    anomalyclip.add_argument("--out", required=True, help="new folder to write the zsad checkpoint to")
    anomalyclip.add_argument("--clip", help="the CLIP it was trained on, Hub id or local copy (default "
                             "openai/clip-vit-large-patch14-336, the authors')")
    anomalyclip.add_argument("--base-model", metavar="HUB_ID", help="the Hub id a local --clip copy was downloaded from")
    anomalyclip.add_argument("--trained-on", metavar="NAME", help="the dataset the prompts were trained on (read from the "
                             "authors' folder names 9_12_4_multiscale: VisA, 9_12_4_multiscale_visa: MVTec AD)")
    anomalyclip.add_argument("--image-size", type=int, default=518, help="input size (default 518, the authors')")
    anomalyclip.set_defaults(command_name="convert_anomalyclip")

    dataset = commands.add_parser("dataset", help="Hugging Face datasets from the layouts zsad reads")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    push = dataset_commands.add_parser("push", parents=[verbose],
                                               help="upload a layout to the Hub as a dataset (images, masks, labels, categories, defect types)")
    push.add_argument("layout", help="mvtec, visa, mpdd, btad, sdd, dagm, dtd, meta or folder")
    push.add_argument("root", help="the dataset's root folder")
    push.add_argument("repo_id", help="Hub dataset repo, ORG/NAME")
    push.add_argument("--split", default="test", help="split to read and to name on the Hub (default test)")
    push.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    push.add_argument("--normal-dirs", nargs="+", default=(), metavar="NAME", help="folder layout: more names of normal-image folders")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--dry-run", metavar="DIR", help="save the dataset to DIR (save_to_disk) instead of pushing it")
    push.set_defaults(command_name="dataset_push")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse (fast), then run the command from ``zsad.cli.commands``; a ``ZSADError`` is printed, exit status 2."""
    args = build_parser().parse_args(argv)
    from zsad.cli.commands import run

    return run(args)
