#!/usr/bin/env python
"""Train a zsad method on an auxiliary dataset (the zero-shot protocol: its *test* split), with Accelerate.

One process (CPU or one GPU):

    python train/train.py --method stackclip --clip openai/clip-vit-large-patch14-336 \\
        --train-dataset mvtec --train-root /data/mvtec_anomaly_detection --output-dir runs/stackclip-mvtec

Several processes or GPUs (``--batch-size`` is per process):

    accelerate launch --num_processes 2 train/train.py --method stackclip ...

Writes to ``--output-dir``: ``epoch-N/`` (a ``save_pretrained`` checkpoint that loads with
``AutoModel.from_pretrained(..., trust_remote_code=True)``, plus ``training_state.pt`` for ``--resume``),
``loss.csv`` (loss per step), ``loss.png`` (loss curve) and ``training_args.json``.

The method is looked up by name in ``METHODS``; every method model provides
``prepare_for_training(class_names)`` and returns ``.loss`` from ``model(pixel_values, class_names,
masks=..., labels=...)``. Method settings are config fields: ``--set key=value`` (repeatable), or the
switches in ``METHOD_FLAGS`` (e.g. StackCLIP's ``--all-data``).
"""

import argparse
import csv
import dataclasses
import json
import logging
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing zsad

from zsad import ZSADError
from zsad import __version__ as zsad_version
from zsad.data import load_dataset
from zsad.data.model_input import TrainingSet
from zsad.detection.visualize import loss_curve_figure
from zsad.modeling.configuration_stackclip import EFA_ALL_DATA, EFA_CLUSTER_SPECIFIC
from zsad.modeling.configuration_zsad_base import DEFAULT_CLIP
from zsad.runtime.atomic import atomic_file, atomic_folder, write_text_atomic
from zsad.runtime.distributed import process_group_closed_at_end
from zsad.runtime.loading import load_backbone
from zsad.runtime.methods import METHODS

STATE_FILE = "training_state.pt"
# A method's config may name its optimizer in an ``optimizer`` field; Adam is the lineage default (METHODS.md).
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
LOSS_FIELDS = ("epoch", "step", "global_step", "loss")
# Defaults of the optimisation options; a method's ``training_recipe`` overrides them (AnomalyCLIP: 15 epochs).
GENERIC_RECIPE = {"epochs": 5, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999)}
# Switches for method settings: flag -> (config field, value, help). Any field can also be set with --set KEY=VALUE.
METHOD_FLAGS = {
    "--cluster-specific": ("efa_training", EFA_CLUSTER_SPECIFIC, "StackCLIP: a cluster's EFA heads see only its categories (default)"),
    "--all-data": ("efa_training", EFA_ALL_DATA, "StackCLIP: every cluster's EFA heads see every training image"),
}


# ----- command line -----------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """An option with a default value ends its help with it; the description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        shown = default is not None and default is not False and default != [] and default != argparse.SUPPRESS
        shown = shown and "default" not in action.help
        return f"{action.help} (default: %(default)s)" if shown else action.help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(METHODS), help="the method to train")
    parser.add_argument("--clip", help=f"Hub id or local path of the CLIP backbone (default: {DEFAULT_CLIP})")
    parser.add_argument("--clip-revision", help="Hub revision (branch, tag or commit) of the backbone")
    parser.add_argument("--base-model", metavar="HUB_ID",
                        help="the Hub id a local --clip copy was downloaded from, recorded so that the checkpoint loads "
                             "(and can be published) where that path does not exist")
    parser.add_argument("--train-dataset", required=True, help="dataset name for zsad.data.load_dataset, e.g. mvtec, visa")
    parser.add_argument("--train-root", required=True, help="folder of the training dataset")
    parser.add_argument("--train-categories", nargs="+", help="train on these categories only (default: all)")
    parser.add_argument("--output-dir", required=True, help="folder for epoch-N/ checkpoints, loss.csv, loss.png, training_args.json")
    recipe = "default: the method's recipe, else {}"
    parser.add_argument("--epochs", type=int, help=f"passes over the training images ({recipe.format(GENERIC_RECIPE['epochs'])}; "
                        "anomalyclip 15, the authors')")
    parser.add_argument("--batch-size", type=int, help=f"images per step and process ({recipe.format(GENERIC_RECIPE['batch_size'])})")
    parser.add_argument("--lr", type=float, help=f"learning rate of the adapters' optimizer ({recipe.format(GENERIC_RECIPE['lr'])})")
    parser.add_argument("--betas", type=float, nargs=2, help=f"Adam betas ({recipe.format(GENERIC_RECIPE['betas'])})")
    parser.add_argument("--image-size", type=int, help="model input size (default: the config's, 518)")
    parser.add_argument("--feature-layers", type=int, nargs="+", help="tapped vision blocks (default: quarter points)")
    parser.add_argument("--seed", type=int, default=111, help="seed of the shuffling, initialisation and every random draw")
    parser.add_argument("--bf16", action="store_true", help="run the steps under bfloat16 autocast (mixed precision)")
    parser.add_argument("--backbone-precision", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the frozen vision transformer (text encoder and heads stay float32)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="continue from an epoch-N folder (without a value: the latest complete one in --output-dir)")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: accept other hyperparameters than the run's so far, recorded in the config as a "
                             "change at the resumed epoch")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config field of the method (VALUE is read as JSON, else as text)")
    for flag, (field, value, help_text) in METHOD_FLAGS.items():
        parser.add_argument(flag, dest="flag_settings", action="append_const", const=(field, value), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the optimisation options it leaves out taken from the method's recipe."""
    args = build_parser().parse_args(argv)
    recipe = GENERIC_RECIPE | METHODS[args.method].training_recipe
    for option, value in recipe.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    args.betas = tuple(args.betas)
    return args


def parse_setting(text: str) -> tuple[str, object]:
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise ZSADError(f"--set expects KEY=VALUE, got '{text}'.")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def config_overrides(args: argparse.Namespace, config_class) -> dict:
    """Config fields from the command line, checked against the method's config."""
    overrides = dict(parse_setting(text) for text in args.settings)
    overrides.update(args.flag_settings or [])
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.feature_layers is not None:
        overrides["feature_layers"] = args.feature_layers
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ZSADError(f"{config_class.__name__} has no setting(s) {unknown}; see its docstring for the fields.")
    return overrides


# ----- model, checkpoints, logs -----------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path:
    """The latest epoch-N folder whose training state reads back; a later, incomplete one (a kill during its save by
    an older zsad, which did not save atomically) is skipped with a line saying so."""
    epochs = sorted(((int(path.name.split("-")[1]), path) for path in output_dir.glob("epoch-*")
                     if path.name.split("-")[1].isdigit()), reverse=True)
    for epoch, path in epochs:
        problem = unreadable_state(path / STATE_FILE)
        if problem is None:
            return path
        print(f"train.py: {path.name} is incomplete ({problem}); resuming from the epoch before it.", file=sys.stderr)
    raise ZSADError(f"--resume: no complete epoch-N checkpoint (with a readable {STATE_FILE}) in {output_dir}; "
                    "start again without --resume.")


def unreadable_state(path: Path) -> str | None:
    """None when ``path`` is a training state torch can read, else what is wrong with it."""
    if not path.is_file():
        return f"no {STATE_FILE}"
    try:
        torch.load(path, weights_only=False)
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as error:
        return f"{STATE_FILE} unreadable: {type(error).__name__}"
    return None


def read_state(resume_dir: Path) -> dict:
    problem = unreadable_state(resume_dir / STATE_FILE)
    if problem:
        raise ZSADError(f"--resume {resume_dir}: {problem}; resume from another epoch (--resume without a value picks the latest "
                        "complete one).")
    return torch.load(resume_dir / STATE_FILE, weights_only=False)


def hyperparameters(args: argparse.Namespace) -> dict:
    """What must stay the same for a resumed run to be the run it continues."""
    return {"lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "betas": list(args.betas), "bf16": args.bf16,
            "train_dataset": args.train_dataset, "train_categories": args.train_categories}


def check_resumed_hyperparameters(state: dict, args: argparse.Namespace, config, resume_dir: Path) -> None:
    """A ZSADError naming what differs from the run so far, unless ``--force``: then the change is recorded in the
    config (``training_changes``: the epoch it took effect after, and each setting's values before and after)."""
    now = hyperparameters(args)
    # A state saved before hyperparameters were stored in it: the ones its config records.
    before = state.get("hyperparameters") or {"lr": getattr(config, "training_learning_rate", args.lr),
                                              "batch_size": getattr(config, "training_batch_size", args.batch_size),
                                              "seed": getattr(config, "training_seed", args.seed)}
    changed = {key: [value, now[key]] for key, value in before.items() if value != now[key]}
    if not changed:
        return
    if not args.force:
        listed = ", ".join(f"--{key.replace('_', '-')} {old} then, {new} now" for key, (old, new) in changed.items())
        raise ZSADError(f"--resume continues the run in {resume_dir.parent} with its own settings, and these differ: {listed}. "
                        "Pass the run's values, or add --force to change them from here on (recorded in the checkpoint's "
                        "config), or train into a new --output-dir.")
    config.training_changes = [*(getattr(config, "training_changes", None) or []), {"after_epoch": state["epoch"], **changed}]


def build_model(args: argparse.Namespace, resume_dir: Path | None):
    model_class = METHODS[args.method]
    overrides = config_overrides(args, model_class.config_class)
    dtype = getattr(torch, args.backbone_precision)
    if resume_dir is None:
        if args.base_model:
            overrides["base_model_hub_id"] = checked_hub_id(args.base_model)
        return model_class.from_clip(args.clip or DEFAULT_CLIP,
                                     revision=args.clip_revision, clip_dtype=dtype, **overrides)
    backbone = load_backbone(args.clip, revision=args.clip_revision, dtype=dtype) if args.clip else None
    model = model_class.from_pretrained(resume_dir, clip_model=backbone, clip_dtype=dtype)
    changed = sorted(key for key, value in overrides.items() if getattr(model.config, key) != value)
    if changed:
        raise ZSADError(f"Settings {changed} differ from the checkpoint {resume_dir}; they cannot change when resuming.")
    return model


def checked_hub_id(name: str) -> str:
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ZSADError(f"--base-model must be a Hub id such as openai/clip-vit-large-patch14-336, got '{name}'.") from error
    return name


def record_training(config, args: argparse.Namespace, categories: list[str]) -> None:
    """What the adapters were trained on, in the config (``training_*`` fields; the model card shows them)."""
    config.training_dataset = args.train_dataset
    config.training_categories = categories
    config.training_image_size = config.image_size
    config.training_batch_size = args.batch_size
    config.training_learning_rate = args.lr
    config.training_seed = args.seed
    config.training_zsad_version = zsad_version


def parameter_checksums(model) -> torch.Tensor:
    """Sum and sum of squares of every trainable tensor (float64): equal on all processes after a sync."""
    values = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in model.adapter_parameters()]
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def read_loss_rows(path: Path, up_to_epoch: int) -> list[dict]:
    """Loss rows of the finished epochs (a crash may have left rows of a later, unfinished one)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= up_to_epoch]


def write_loss_rows(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ----- training ---------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    return Accelerator(
        cpu=args.cpu,
        mixed_precision="bf16" if args.bf16 else "no",
        # Epoch e's shuffle depends only on (seed, e), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Methods may leave some adapters unused in a step (e.g. a cluster with no image in the batch).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def make_loader(args: argparse.Namespace, model) -> DataLoader:
    samples = load_dataset(args.train_dataset, args.train_root, categories=args.train_categories, split="test")
    if not samples:
        raise ZSADError(f"No images found for '{args.train_dataset}' in {args.train_root}.")
    dataset = TrainingSet(samples, model.image_processor)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                      num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The method's optimizer over its adapter parameters only (the backbone is frozen)."""
    name = getattr(model.config, "optimizer", "adam")
    if name not in OPTIMIZERS:
        raise ZSADError(f"Unknown optimizer '{name}' in the {args.method} config; use one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](model.adapter_parameters(), lr=args.lr, betas=tuple(args.betas))


def save_epoch(accelerator, model, optimizer, output_dir: Path, epoch: int, global_step: int, args: argparse.Namespace) -> Path:
    """``save_pretrained`` checkpoint + resume state, after checking all processes hold the same weights."""
    unwrapped = accelerator.unwrap_model(model)
    checksums = accelerator.gather(parameter_checksums(unwrapped).to(accelerator.device)[None]).cpu()
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"Processes hold different weights after epoch {epoch}; the checkpoint would be wrong.")
    folder = output_dir / f"epoch-{epoch}"
    if accelerator.is_main_process:
        unwrapped.config.is_trained = True
        unwrapped.config.training_epochs = epoch
        state = {"epoch": epoch, "global_step": global_step, "optimizer": optimizer.state_dict(),
                 "rng": rng_state(), "parameter_checksums": checksums, "hyperparameters": hyperparameters(args)}
        # One artefact: a kill leaves the previous epochs and no half-written epoch-N.
        with atomic_folder(folder, marker="config.json") as staging:
            unwrapped.save_pretrained(staging)
            torch.save(state, staging / STATE_FILE)
    accelerator.wait_for_everyone()
    return folder


def train(args: argparse.Namespace) -> Path:
    """Run the training; returns the last epoch's checkpoint folder."""
    if not METHODS[args.method].has_adapters:
        raise ZSADError(f"'{args.method}' is training-free: it has no weights to train. Use it as it is "
                        f"(zsad predict --model {args.method} ...), or train one of "
                        f"{sorted(name for name, model in METHODS.items() if model.has_adapters)}.")
    if args.force and not args.resume:
        raise ZSADError("--force applies only with --resume (to change hyperparameters of a resumed run).")
    with process_group_closed_at_end(make_accelerator(args)) as accelerator:
        return train_with(accelerator, args)


def train_with(accelerator: Accelerator, args: argparse.Namespace) -> Path:
    if accelerator.is_main_process:
        # Model code reports what it decides while preparing (e.g. StackCLIP's cluster count) at INFO.
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("zsad").setLevel(logging.INFO)
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    output_dir = Path(args.output_dir)
    resume_dir = (latest_checkpoint(output_dir) if args.resume == "latest" else Path(args.resume)) if args.resume else None
    state = read_state(resume_dir) if resume_dir is not None else None

    model = build_model(args, resume_dir)
    loader = make_loader(args, model)
    categories = sorted({sample.category for sample in loader.dataset.samples})
    if state is not None:
        check_resumed_hyperparameters(state, args, model.config, resume_dir)
    model.prepare_for_training(categories)
    record_training(model.config, args, categories)
    model.train()
    optimizer = make_optimizer(model, args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    start_epoch, global_step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "training_args.json", json.dumps(vars(args), indent=2, default=str))
    rows = read_loss_rows(output_dir / "loss.csv", start_epoch)

    folder = resume_dir
    for epoch in range(start_epoch + 1, args.epochs + 1):
        loader.set_epoch(epoch)
        progress = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", disable=not accelerator.is_local_main_process)
        for step, batch in enumerate(progress, start=1):
            with accelerator.autocast():
                loss = model(batch["pixel_values"], batch["class_names"], masks=batch["masks"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            global_step += 1
            mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            rows.append({"epoch": epoch, "step": step, "global_step": global_step, "loss": mean_loss})
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        folder = save_epoch(accelerator, model, optimizer, output_dir, epoch, global_step, args)
        if accelerator.is_main_process:
            write_loss_rows(output_dir / "loss.csv", rows)
            loss_curve_figure(rows, output_dir / "loss.png", f"{args.method} on {args.train_dataset}")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folder = train(args)
    except ZSADError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"train.py: interrupted; the finished epochs are kept in {Path(args.output_dir).resolve()}. Continue with the same "
              "command and --resume.", file=sys.stderr)
        return 130
    print(f"Trained {args.method} on {args.train_dataset} for {args.epochs} epochs; checkpoint: {folder.resolve()}")
    print(f"Loss per step: {Path(args.output_dir).resolve() / 'loss.csv'} (curve: loss.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
