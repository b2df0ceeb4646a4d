"""The ``zsad`` command: ``zsad predict | calibrate | evaluate | publish | tiny-clip``."""

import argparse
import sys

from .errors import ZSADError
from .profile import DEFAULT_FUSION_WEIGHT, DEFAULT_MARGIN, DEFAULT_QUANTILE


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
    from .inference import AnomalyDetector
    from .predict import predict_files
    from .profile import ProductProfile

    if args.profile and args.reference:
        raise ZSADError("Pass either --profile (a saved profile) or --reference (good images to build one from), not both.")
    detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size)
    profile = ProductProfile.load(args.profile) if args.profile else None
    if args.reference:
        profile = detector.build_profile(None, args.class_name, args.reference, progress=True)
        print(f"Profile: {profile.describe()}")
    summary = predict_files(detector, args.images, args.class_name, args.out, threshold=args.threshold, batch_size=args.batch_size,
                            profile=profile)
    failed = [record for record in summary["images"] if "error" in record]
    print(f"{len(summary['images']) - len(failed)} images scored; overlays, masks and scores.json in {args.out}")
    if failed:
        raise ZSADError(f"{len(failed)} of {len(summary['images'])} images could not be read (their errors are in scores.json).")


def _calibrate(args: argparse.Namespace) -> None:
    from .inference import AnomalyDetector

    if args.masks and not args.defective:
        raise ZSADError("--masks needs --defective (the masks mark the defects in those images).")
    detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size)
    profile = detector.build_profile(None, args.class_name, args.normal, args.defective, args.masks, quantile=args.quantile,
                                     margin=args.margin, fusion_weight=args.fusion_weight, progress=True)
    profile.save(args.out)
    print(f"Profile of '{profile.class_name}' for {profile.method}: {profile.describe()}")
    calibration = profile.calibration
    if calibration is None:
        print("Thresholds: uncalibrated (0.5); give at least two good images to calibrate.")
    else:
        print(f"Thresholds ({calibration.rule}): image {calibration.image_threshold:.4f}, pixel {calibration.pixel_threshold:.4f}")
        print(f"Leave-one-out false-alarm rate on the good images: {calibration.false_alarm_rate():.1%}")
    print(f"Saved to {args.out}")


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
    predict.add_argument("--threshold", type=float,
                         help="for the masks and the verdicts (default: a profile's calibrated thresholds, else 0.5)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    predict.add_argument("--profile", metavar="DIR", help="a product profile from `zsad calibrate` (references and thresholds)")
    predict.add_argument("--reference", nargs="+", metavar="GOOD", help="images or folders of good parts: a profile built on the fly")
    predict.set_defaults(run=_predict)

    calibrate = commands.add_parser("calibrate", help="a product profile: reference images of good parts and calibrated thresholds")
    calibrate.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    calibrate.add_argument("--class-name", required=True, help="what the product is, e.g. 'metal nut'")
    calibrate.add_argument("--normal", required=True, nargs="+", metavar="GOOD", help="images or folders of good parts (the references)")
    calibrate.add_argument("--defective", nargs="+", metavar="BAD", help="images or folders of defective parts (F1-optimal thresholds)")
    calibrate.add_argument("--masks", metavar="DIR", help="folder of defect masks named like the defective images (000.png or 000_mask.png)")
    calibrate.add_argument("--out", required=True, help="folder for the profile (profile.json, memory.safetensors)")
    calibrate.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                           help=f"good images only: thresholds at this quantile of the good scores (default {DEFAULT_QUANTILE}: the maximum)")
    calibrate.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help=f"added to that quantile (default {DEFAULT_MARGIN})")
    calibrate.add_argument("--fusion-weight", type=float, default=DEFAULT_FUSION_WEIGHT,
                           help=f"share of the reference map in the fused map and score (default {DEFAULT_FUSION_WEIGHT})")
    calibrate.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    calibrate.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    calibrate.set_defaults(run=_calibrate)

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
