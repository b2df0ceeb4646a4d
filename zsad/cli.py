"""The ``zsad`` command: ``zsad predict | export | evaluate | publish | dataset push | tiny-clip``."""

import argparse
import sys

from .errors import ZSADError


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
    from .inference import DEFAULT_THRESHOLD, AnomalyDetector
    from .predict import predict_files

    if args.engine == "torch":
        if args.class_name is None:
            raise ZSADError("Say what the product is with --class-name, e.g. --class-name 'metal nut'.")
        detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size)
        class_name, threshold = args.class_name, DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    else:
        from .export import ExportedGraphPredictor

        detector = ExportedGraphPredictor.load(args.model, args.engine)
        class_name = detector.detector.resolve_class_name(args.class_name)
        threshold = detector.detector.threshold(class_name) if args.threshold is None else args.threshold
    summary = predict_files(detector, args.images, class_name, args.out, threshold=threshold, batch_size=args.batch_size)
    failed = [record for record in summary["images"] if "error" in record]
    print(f"{len(summary['images']) - len(failed)} images scored; overlays, masks and scores.json in {args.out}")
    if failed:
        raise ZSADError(f"{len(failed)} of {len(summary['images'])} images could not be read (their errors are in scores.json).")


def _export(args: argparse.Namespace) -> None:
    from .export import export

    path = export(args.model, args.class_name, args.out, format=args.format, precision=args.precision,
                  profile=args.profile, threshold=args.threshold, clip=args.clip, image_size=args.image_size)
    print(f"{path} and {path.parent / 'zsad_deploy.json'} written; run them with `zsad predict --engine {args.format} --model {args.out} IMAGE`")


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
    predict.add_argument("--threshold", type=float, help="for the masks and the verdicts (default 0.5, or an exported graph's own)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--image-size", type=int, help="input size of an untrained model (default 518)")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="one method and fixed product names as an ONNX / OpenVINO graph that runs without torch")
    export.add_argument("--model", required=True, help="a method name (baseline, stackclip, genclip: untrained) or a checkpoint folder / Hub id")
    export.add_argument("--class-name", required=True, action="append", help="a product name the graph scores (repeat for several)")
    export.add_argument("--format", required=True, choices=["onnx", "openvino"])
    export.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="int8: the vision transformer's linear layers")
    export.add_argument("--out", required=True, help="folder for the graph and zsad_deploy.json")
    export.add_argument("--profile", help="a product profile folder whose thresholds the graph carries (not available yet)")
    export.add_argument("--threshold", type=float, default=0.5, help="the verdict/mask threshold stored with the graph (default 0.5)")
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
