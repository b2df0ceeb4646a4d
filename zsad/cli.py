"""The ``zsad`` command: ``zsad predict | evaluate | publish | tiny-clip``."""

import argparse
import sys

from .errors import ZSADError
from .loading import PRECISIONS, add_device_argument


def _tiny_clip(args: argparse.Namespace) -> None:
    from .tiny_clip import save_tiny_clip

    print(save_tiny_clip(args.directory, seed=args.seed))


def _publish(args: argparse.Namespace) -> None:
    from .hub import export, publish

    if args.dry_run:
        print(export(args.checkpoint, args.dry_run, eval_json=args.eval, repo_id=args.repo_id))
        return
    commit = publish(args.checkpoint, args.repo_id, eval_json=args.eval, token=args.token, private=args.private)
    print(commit.commit_url)


def _predict(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from .distributed import process_group_closed_at_end
    from .inference import AnomalyDetector
    from .loading import resolve_device, resolve_precision
    from .predict import predict_files

    # Under `accelerate launch` every process takes its own share of the images on its own device.
    with process_group_closed_at_end(Accelerator(cpu=args.device == "cpu")) as accelerator:
        device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
        detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size, device=device,
                                             dtype=resolve_precision(args.precision, device))
        summary = predict_files(detector, args.images, args.class_name, args.out, threshold=args.threshold, batch_size=args.batch_size,
                                display_side=args.display_side, tiles=args.tiles, resume=args.resume, state=accelerator)
    if not summary:  # not the main process: the main one reports
        return
    failed = [record for record in summary["images"] if "error" in record]
    print(f"{len(summary['images']) - len(failed)} images scored; overlays, masks and scores.json in {args.out}")
    if failed:
        raise ZSADError(f"{len(failed)} of {len(summary['images'])} images could not be read (their errors are in scores.json).")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="Zero-shot industrial anomaly detection with CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-clip", help="write a tiny random CLIP for offline tests and UI work")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_clip)

    predict = commands.add_parser("predict", help="anomaly scores, overlays and masks for image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    predict.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    predict.add_argument("--class-name", required=True, help="what the product is, e.g. 'metal nut'")
    predict.add_argument("--out", required=True, help="folder for <image>_overlay.png, <image>_mask.png and scores.json")
    predict.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    predict.add_argument("--threshold", type=float, default=0.5, help="for the masks and the verdicts (default 0.5)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    add_device_argument(predict)
    predict.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="vision backbone precision; auto = bfloat16 where the device runs it natively, float16 on GPUs without "
                         "bfloat16, else float32")
    predict.add_argument("--display-side", type=int, metavar="PIXELS",
                         help="write overlays and masks with their longest side at most PIXELS (default: each image's full size)")
    predict.add_argument("--tiles", action="store_true",
                         help="score each image at full resolution in overlapping windows of the model's input size "
                         "(small defects on large images; one pass per window)")
    predict.add_argument("--resume", action="store_true", help="keep the images already done in --out (records-*.jsonl), do the rest")
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("evaluate", help="per-category and mean metrics of a model on a benchmark (JSON, Markdown, figure)")
    from .evaluation import add_arguments

    add_arguments(evaluate)
    evaluate.set_defaults(run=_evaluate)

    publish = commands.add_parser("publish", help="upload a checkpoint (weights, config, code, model card) in one Hub commit")
    publish.add_argument("checkpoint", help="checkpoint folder written by save_pretrained or training")
    publish.add_argument("--repo-id", required=True, help="Hub repo, ORG/NAME")
    publish.add_argument("--eval", help="evaluation JSON from `zsad evaluate`; fills the card's model-index")
    publish.add_argument("--token", help="Hub token (default: the logged-in one)")
    publish.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    publish.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded to DIR instead")
    publish.set_defaults(run=_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ZSADError as error:
        print(f"zsad {args.command}: {error}", file=sys.stderr)
        return 2
    return 0
