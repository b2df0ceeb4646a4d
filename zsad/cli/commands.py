"""The ``zsad`` command's work: ``zsad predict | calibrate | export | evaluate | publish | dataset push | tiny-clip``.

The parser lives in ``zsad_cli`` (it answers ``--help`` and argument errors without importing torch); each command
here imports what it needs when it runs, so ``zsad predict --engine onnx|openvino`` runs where torch is not installed.
"""

import argparse
import shlex
import sys

from ..modeling.exceptions import ZSADError
from ..runtime.noise import quiet_library_progress

__all__ = ["evaluate", "run"]


def _tiny_clip(args: argparse.Namespace) -> None:
    from ..runtime.tiny_clip import save_tiny_clip
    from .summaries import tiny_clip_summary

    print(tiny_clip_summary(save_tiny_clip(args.directory, seed=args.seed)))


def _convert_anomalyclip(args: argparse.Namespace) -> None:
    from ..hub.convert_anomalyclip import convert_anomalyclip

    out = convert_anomalyclip(args.file, args.out, clip=args.clip, base_model=args.base_model, trained_on=args.trained_on,
                              image_size=args.image_size)
    print(f"wrote {out}: AnomalyCLIP converted from {args.file}; run it with `zsad predict --model {out} IMAGE`")


def _publish(args: argparse.Namespace) -> None:
    from ..hub.publish import publish, write_publish_folder
    from .summaries import dry_run_summary

    if args.dry_run:
        folder, backbone_check = write_publish_folder(args.checkpoint, args.dry_run, eval_json=args.eval, repo_id=args.repo_id,
                                                      base_model=args.base_model, tiny_backbone_for_tests=args.tiny_backbone_for_tests)
        print(backbone_check)
        print(dry_run_summary(folder, args.repo_id))
        return
    commit = publish(args.checkpoint, args.repo_id, eval_json=args.eval, token=args.token, private=args.private,
                     base_model=args.base_model, tiny_backbone_for_tests=args.tiny_backbone_for_tests)
    print(f"Published to https://huggingface.co/{args.repo_id}: {commit.commit_url}")
    print(f"Load it with AutoModel.from_pretrained('{args.repo_id}', trust_remote_code=True) or zsad predict IMAGE "
          f"--model {args.repo_id} --class-name NAME --out predictions")


def _predict(args: argparse.Namespace) -> None:
    from .predict import predict_files

    if args.profile and args.reference:
        raise ZSADError("Pass either --profile (a saved profile) or --reference (good images to build one from), not both.")
    if args.rescore and not args.mutual:
        raise ZSADError("--rescore re-scores mutual scores; add --mutual.")
    if args.mutual and args.engine == "onnx":
        raise ZSADError("--mutual runs a model, not an exported graph (which scores one image at a time): use --engine torch or openvino.")
    if _runs_exported_graph(args):
        if args.mutual:
            raise ZSADError("--mutual runs a model, not an exported graph (which scores one image at a time).")
        if args.profile or args.reference:
            raise ZSADError("--profile and --reference run a model, not an exported graph (which carries its own thresholds).")
        from ..deploy.runtime import ExportedGraphPredictor, OneProcess

        detector = ExportedGraphPredictor.load(args.model, args.engine)
        class_name = detector.detector.resolve_class_name(args.class_name)
        summary = predict_files(detector, args.images, class_name, args.out, threshold=args.threshold, batch_size=args.batch_size,
                                display_side=args.display_side, resume=args.resume, state=OneProcess())
    else:
        from accelerate import Accelerator

        from ..detection.detector import AnomalyDetector
        from ..detection.profile import ProductProfile
        from ..runtime.distributed import process_group_closed_at_end
        from ..runtime.loading import Runtime

        # Under `accelerate launch` every process takes its own share of the images on its own device.
        with process_group_closed_at_end(Accelerator(cpu=args.device == "cpu")) as accelerator:
            device = accelerator.device if accelerator.num_processes > 1 else args.device
            detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size,
                                                 runtime=Runtime.resolve(device, args.precision), engine=args.engine)
            profile = ProductProfile.load(args.profile) if args.profile else None
            class_name = _product_name(detector, args, profile)
            if args.reference:
                profile = detector.build_profile(None, class_name, args.reference, progress=accelerator.is_main_process)
                if accelerator.is_main_process:
                    print(f"Profile: {profile.describe()}")
            summary = predict_files(detector, args.images, class_name, args.out, threshold=args.threshold,
                                    batch_size=args.batch_size, profile=profile, display_side=args.display_side, tiles=args.tiles,
                                    resume=args.resume, state=accelerator, mutual=args.mutual,
                                    mutual_settings=_mutual_settings(args))
    if not summary:  # not the main process: the main one reports
        return
    from .summaries import predict_summary

    if not _runs_exported_graph(args):
        summary["vision_engine"] = detector.engine.describe()

    failed = [record for record in summary["images"] if "error" in record]
    print(predict_summary(summary, args.out))
    if failed:
        raise ZSADError(f"{len(failed)} of {len(summary['images'])} images could not be read or scored (their errors are in "
                        "scores.json).")


def _runs_exported_graph(args: argparse.Namespace) -> bool:
    """``--engine onnx``, or ``--engine openvino`` with ``--model`` a folder written by ``zsad export``; otherwise the
    engine runs the vision pass of a model."""
    from pathlib import Path

    exported = (Path(args.model) / "zsad_deploy.json").is_file()
    if args.engine == "onnx" and not exported:
        raise ZSADError(f"--engine onnx runs a folder written by `zsad export`; {args.model} is not one (no zsad_deploy.json).")
    return args.engine == "onnx" or (args.engine == "openvino" and exported)


def _product_name(detector, args: argparse.Namespace, profile) -> str:
    """``--class-name``; without it, the profile's product or the generic name for a method whose prompts name no
    product (AnomalyCLIP), or the generic name for ``--mutual`` where no text is used."""
    from ..modeling.class_names import UNNAMED_PRODUCT

    if args.class_name is not None:
        return args.class_name
    if not detector.names_the_product():
        return profile.class_name if profile else UNNAMED_PRODUCT
    if args.mutual:
        return _unnamed_mutual_product(detector, args)
    raise ZSADError("Say what the product is with --class-name, e.g. --class-name 'metal nut'.")


def _mutual_settings(args: argparse.Namespace):
    from ..modeling.mutual_scoring import MutualSettings

    return MutualSettings(rescore=args.rescore)


def _unnamed_mutual_product(detector, args: argparse.Namespace) -> str:
    """The product's name for ``--mutual`` without ``--class-name``: allowed where no text is used (an untrained method,
    whose text map mutual scoring leaves out, and no profile, which is tied to a product name)."""
    method = detector.method_names[0]
    if detector.status(method) == "trained":
        raise ZSADError(f"Say what the product is with --class-name: {method} is trained, so its text map is part of the mutual scores.")
    if args.profile or args.reference:
        raise ZSADError("Say what the product is with --class-name: a profile (--profile/--reference) belongs to a named product.")
    from ..modeling.mutual_scoring import UNNAMED_PRODUCT

    return UNNAMED_PRODUCT


def _export(args: argparse.Namespace) -> None:
    from ..deploy.export import export

    path = export(args.model, args.class_name, args.out, format=args.format, precision=args.precision,
                  profile=args.profile, threshold=args.threshold, clip=args.clip, image_size=args.image_size)
    names = "" if args.class_name is None or len(args.class_name) == 1 else f" --class-name {shlex.quote(args.class_name[0])}"
    print(f"{path} and {path.parent / 'zsad_deploy.json'} written; run them with "
          f"`zsad predict IMAGE --engine {args.format} --model {shlex.quote(str(args.out))}{names} --out predictions`")


def _calibrate(args: argparse.Namespace) -> None:
    from ..detection.detector import AnomalyDetector
    from ..detection.profile import ProductProfile
    from ..runtime.loading import Runtime
    from .summaries import calibrate_summary

    if args.masks and not args.defective:
        raise ZSADError("--masks needs --defective (the masks mark the defects in those images).")
    if args.normal and not args.class_name:
        raise ZSADError("--normal needs --class-name (what the product is, e.g. 'metal nut').")
    if args.allow_higher_rate and args.false_alarm_rate is None and not args.add:
        raise ZSADError("--allow-higher-rate goes with --false-alarm-rate (the rate it may exceed).")
    if args.add and args.defective:
        raise ZSADError("--add takes good images only; to calibrate on defective images, run `zsad calibrate --normal ... "
                        "--defective ...` with all the good images.")
    previous = ProductProfile.load(args.out) if args.add else None
    detector = AnomalyDetector.for_model(args.model, clip=args.clip, image_size=args.image_size,
                                         runtime=Runtime.resolve(args.device, args.precision), engine=args.engine)
    if previous is not None:
        profile = detector.add_references(previous, args.add, false_alarm_rate=args.false_alarm_rate,
                                          allow_higher_rate=True if args.allow_higher_rate else None, progress=True)
    else:
        profile = detector.build_profile(None, args.class_name, args.normal, args.defective, args.masks, quantile=args.quantile,
                                         margin=args.margin, fusion_weight=args.fusion_weight, false_alarm_rate=args.false_alarm_rate,
                                         allow_higher_rate=args.allow_higher_rate, progress=True)
    profile.save(args.out)
    print(calibrate_summary(profile, args.out, previous))
    print(f"Vision pass: {detector.engine.describe()}")


def evaluate(args: argparse.Namespace) -> dict | None:
    """``zsad evaluate`` (and ``train/evaluate.py`` under ``accelerate launch``) from parsed evaluation options; the
    main process writes the outputs and returns their paths, the other processes return None."""
    from accelerate import Accelerator

    from ..data.hf import COLUMNS
    from ..evaluation.few_shot import evaluate_few_shot
    from ..evaluation.protocol import evaluate as evaluate_zero_shot
    from ..evaluation.protocol import few_shot_table, markdown_table, write_outputs
    from ..runtime.distributed import process_group_closed_at_end

    if args.shots and args.mutual:
        raise ZSADError("--mutual and --shots cannot be combined; compare them in two runs.")
    if args.rescore and not args.mutual:
        raise ZSADError("--rescore re-scores mutual scores; add --mutual.")
    with process_group_closed_at_end(Accelerator()) as accelerator:
        options = dict(categories=args.categories, clip=args.clip, image_size=args.image_size, batch_size=args.batch_size,
                       num_workers=args.num_workers, accelerator=accelerator, precision=args.precision, device=args.device,
                       engine=args.engine)
        if args.shots:
            report, records = evaluate_few_shot(args.model, args.dataset, args.root, args.shots, args.seeds, **options)
        else:
            report, records = evaluate_zero_shot(args.model, args.dataset, args.root, normal_dirs=args.normal_dirs,
                                                 columns={role: getattr(args, f"{role}_column") for role in COLUMNS},
                                                 tiles=args.tiles, mutual=args.mutual, mutual_settings=_mutual_settings(args),
                                                 **options)
    if not accelerator.is_main_process:
        return None
    paths = write_outputs(report, records, args.out)
    print(markdown_table(report) + (few_shot_table(report) if "few_shot" in report else ""))
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
    return paths


def _dataset_push(args: argparse.Namespace) -> None:
    from ..data import to_hf_dataset

    dataset = to_hf_dataset(args.layout, args.root, categories=args.categories, split=args.split, normal_dirs=args.normal_dirs)
    summary = f"{dataset.num_rows} images ({sum(dataset['label'])} anomalous) in {len(set(dataset['category']))} categories"
    if args.dry_run:
        dataset.save_to_disk(args.dry_run)
        print(f"{summary} saved to {args.dry_run} (evaluate it with --dataset hf-disk:{args.dry_run})")
        return
    commit = dataset.push_to_hub(args.repo_id, split=args.split, private=args.private, token=args.token)
    print(f"{summary} pushed to {args.repo_id}: {commit.commit_url}")


COMMANDS = {"tiny_clip": _tiny_clip, "predict": _predict, "calibrate": _calibrate, "export": _export, "evaluate": evaluate,
            "publish": _publish, "dataset_push": _dataset_push, "convert_anomalyclip": _convert_anomalyclip}


def run(args: argparse.Namespace) -> int:
    """Run a command parsed by ``zsad_cli.build_parser``; a ``ZSADError`` is printed (exit status 2)."""
    if not args.verbose:
        quiet_library_progress()  # the command owns its process: once, for every library
    try:
        COMMANDS[args.command_name](args)
    except ZSADError as error:
        print(f"zsad {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zsad {args.command}: {interrupted_line(args)}", file=sys.stderr)
        return 130
    return 0


def interrupted_line(args: argparse.Namespace) -> str:
    """The one line Ctrl-C ends a command with: what was kept and how to go on."""
    if args.command_name == "predict":
        from pathlib import Path

        from .predict import read_records

        out = Path(args.out)
        kept = sum("score" in record for record in read_records(out)) if out.is_dir() else 0
        return (f"interrupted; the results of {kept} image{'s' if kept != 1 else ''} are kept in {out.resolve()}. "
                "Run the same command with --resume to score the rest.")
    return "interrupted; nothing was written that a later run could mistake for a finished one. Run the command again."
