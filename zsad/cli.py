"""The ``zsad`` command: ``zsad predict | calibrate | export | evaluate | publish | dataset push | tiny-clip``."""

import argparse
import sys

from .errors import ZSADError
from .loading import PRECISIONS, add_device_argument
from .profile import DEFAULT_MARGIN, DEFAULT_QUANTILE


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
    from .profile import ProductProfile

    if args.profile and args.reference:
        raise ZSADError("Pass either --profile (a saved profile) or --reference (good images to build one from), not both.")
    if args.engine != "torch":
        if args.profile or args.reference:
            raise ZSADError("--profile and --reference need --engine torch; an exported graph carries its own thresholds.")
        from .export import ExportedGraphPredictor

        detector = ExportedGraphPredictor.load(args.model, args.engine)
        class_name = detector.detector.resolve_class_name(args.class_name)
        summary = predict_files(detector, args.images, class_name, args.out, threshold=args.threshold, batch_size=args.batch_size,
                                display_side=args.display_side, resume=args.resume)
    else:
        if args.class_name is None:
            raise ZSADError("Say what the product is with --class-name, e.g. --class-name 'metal nut'.")
        # Under `accelerate launch` every process takes its own share of the images on its own device.
        with process_group_closed_at_end(Accelerator(cpu=args.device == "cpu")) as accelerator:
            device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
            detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size, device=device,
                                                 dtype=resolve_precision(args.precision, device))
            profile = ProductProfile.load(args.profile) if args.profile else None
            if args.reference:
                profile = detector.build_profile(None, args.class_name, args.reference, progress=accelerator.is_main_process)
                if accelerator.is_main_process:
                    print(f"Profile: {profile.describe()}")
            summary = predict_files(detector, args.images, args.class_name, args.out, threshold=args.threshold,
                                    batch_size=args.batch_size, profile=profile, display_side=args.display_side, tiles=args.tiles,
                                    resume=args.resume, state=accelerator)
    if not summary:  # not the main process: the main one reports
        return
    failed = [record for record in summary["images"] if "error" in record]
    print(f"{len(summary['images']) - len(failed)} images scored; overlays, masks and scores.json in {args.out}")
    if failed:
        raise ZSADError(f"{len(failed)} of {len(summary['images'])} images could not be read (their errors are in scores.json).")


def _export(args: argparse.Namespace) -> None:
    from .export import export

    path = export(args.model, args.class_name, args.out, format=args.format, precision=args.precision,
                  profile=args.profile, threshold=args.threshold, clip=args.clip, image_size=args.image_size)
    print(f"{path} and {path.parent / 'zsad_deploy.json'} written; run them with `zsad predict --engine {args.format} --model {args.out} IMAGE`")


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


def _dataset_push(args: argparse.Namespace) -> None:
    from .data import to_hf_dataset

    dataset = to_hf_dataset(args.layout, args.root, categories=args.categories, split=args.split, normal_dirs=args.normal_dirs)
    summary = f"{dataset.num_rows} images ({sum(dataset['label'])} anomalous) in {len(set(dataset['category']))} categories"
    if args.dry_run:
        dataset.save_to_disk(args.dry_run)
        print(f"{summary} saved to {args.dry_run} (evaluate it with --dataset hf-disk:{args.dry_run})")
        return
    commit = dataset.push_to_hub(args.repo_id, split=args.split, private=args.private, token=args.token)
    print(f"{summary} pushed to {args.repo_id}: {commit.commit_url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsad", description="Zero-shot industrial anomaly detection with CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-clip", help="write a tiny random CLIP for offline tests and UI work")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_clip)

    predict = commands.add_parser("predict", help="anomaly scores, overlays and masks for image files")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    predict.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained), a checkpoint folder / Hub id, "
                         "or with --engine onnx|openvino a folder written by `zsad export`")
    predict.add_argument("--class-name", help="what the product is, e.g. 'metal nut' (an exported graph's only name by default)")
    predict.add_argument("--engine", choices=["torch", "onnx", "openvino"], default="torch",
                         help="torch (default), or run an exported graph with ONNX Runtime / OpenVINO")
    predict.add_argument("--out", required=True, help="folder for <image>_overlay.png, <image>_mask.png and scores.json")
    predict.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    predict.add_argument("--threshold", type=float,
                         help="for the masks and the verdicts (default: a profile's calibrated thresholds, an exported graph's own, else 0.5)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    predict.add_argument("--profile", metavar="DIR", help="a product profile from `zsad calibrate` (references and thresholds)")
    predict.add_argument("--reference", nargs="+", metavar="GOOD", help="images or folders of good parts: a profile built on the fly")
    add_device_argument(predict)
    predict.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="vision backbone precision; auto = bfloat16 where the device runs it natively, float16 on GPUs without "
                         "bfloat16, int8 vision linears on other CPUs")
    predict.add_argument("--display-side", type=int, metavar="PIXELS",
                         help="write overlays and masks with their longest side at most PIXELS (default: each image's full size)")
    predict.add_argument("--tiles", action="store_true",
                         help="score each image at full resolution in overlapping windows of the model's input size "
                         "(small defects on large images; one pass per window)")
    predict.add_argument("--resume", action="store_true", help="keep the images already done in --out (records-*.jsonl), do the rest")
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
    calibrate.add_argument("--fusion-weight", type=float, default=None,
                           help="share of the reference map in the fused map (both on the good images' scale); default: "
                                "chosen on the defective images when given, else 1 untrained, 0.5 trained")
    calibrate.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    calibrate.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    calibrate.set_defaults(run=_calibrate)

    export = commands.add_parser("export", help="one method and fixed product names as an ONNX / OpenVINO graph that runs without torch")
    export.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    export.add_argument("--class-name", action="append", help="a product name the graph scores (repeat for several; default: the profile's product)")
    export.add_argument("--format", required=True, choices=["onnx", "openvino"])
    export.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="int8: the vision transformer's linear layers")
    export.add_argument("--out", required=True, help="folder for the graph and zsad_deploy.json")
    export.add_argument("--profile", help="a product profile folder (`zsad calibrate`): its reference images go into the graph for its product, "
                                          "with its calibrated thresholds")
    export.add_argument("--threshold", type=float, help="the verdict/mask threshold stored with the graph (default: a profile's calibrated "
                                                        "thresholds for its product, else 0.5)")
    export.add_argument("--clip", help="CLIP backbone Hub id or local path (default: the checkpoint's own)")
    export.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    export.set_defaults(run=_export)

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

    dataset = commands.add_parser("dataset", help="Hugging Face datasets from the layouts zsad reads")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    push = dataset_commands.add_parser("push", help="upload a layout to the Hub as a dataset (images, masks, labels, categories, defect types)")
    push.add_argument("layout", help="mvtec, visa, mpdd, btad, sdd, dagm, dtd, meta or folder")
    push.add_argument("root", help="the dataset's root folder")
    push.add_argument("repo_id", help="Hub dataset repo, ORG/NAME")
    push.add_argument("--split", default="test", help="split to read and to name on the Hub (default test)")
    push.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    push.add_argument("--normal-dirs", nargs="+", default=(), metavar="NAME", help="folder layout: more names of normal-image folders")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--dry-run", metavar="DIR", help="save the dataset to DIR (save_to_disk) instead of pushing it")
    push.set_defaults(run=_dataset_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ZSADError as error:
        print(f"zsad {args.command}: {error}", file=sys.stderr)
        return 2
    return 0
