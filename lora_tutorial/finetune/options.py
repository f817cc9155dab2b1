"""The command line's options, and every check on them before a run starts.

:func:`parse_args` fills in the defaults that depend on the mode (quick, rehearsal or full) and
turns every bad value (a NaN learning rate, a negative seed, an output folder that is a file or
holds the user's files ...) into a usage error, before any data is read or any weight loaded.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from lora_tutorial import gpt, train
from lora_tutorial.finetune import output_folder
from lora_tutorial.runtime import config, download, rehearsal

PROG = "python -m lora_tutorial.finetune"
PRETRAINED = [name for name in gpt.GPT_CONFIGS if name in download.KNOWN_FILES]
MAX_SEED = 2**32 - 1  # pandas' random_state takes seeds below 2**32


def _number(kind: type, minimum: float, *, strict: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` above ``minimum`` (or at it, unless ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"{'above' if strict else 'at least'} {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: need a finite number {bound}")
        return value

    return parse


POSITIVE_INT, POSITIVE = _number(int, 0, strict=True), _number(float, 0, strict=True)
NON_NEGATIVE = _number(float, 0, strict=False)


def _seed(text: str) -> int:
    value = int(_number(int, 0, strict=False)(text))
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is at most {MAX_SEED}")
    return value


class _Parser(argparse.ArgumentParser):
    """Under torchrun, only rank 0 prints a usage error; the other processes exit quietly."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (defaults that depend on the mode are filled in later)."""
    parser = _Parser(
        prog=PROG,
        description="Fine-tune GPT-2 to classify SMS messages as spam or ham, with LoRA or a "
        "baseline method.",
    )
    add = parser.add_argument
    add("--model", default="gpt2-small", choices=PRETRAINED, help="GPT-2 size (%(default)s)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--quick",
        action="store_true",
        help="tiny random model, few messages and steps: a fast check that needs no download "
        f"(also {config.QUICK_ENV}=1)",
    )
    modes.add_argument(
        "--rehearsal",
        action="store_true",
        help="full mode at full size with random weights, stopped after "
        f"{rehearsal.TRAIN_STEPS} steps: proves full mode runs; numbers are meaningless "
        f"(also {config.REHEARSAL_ENV}=1)",
    )
    add("--method", default="lora", choices=train.METHODS, help="what to train (%(default)s)")
    add("--rank", type=POSITIVE_INT, default=train.LORA_RANK, help="LoRA rank (%(default)s)")
    add(
        "--alpha",
        type=POSITIVE,
        default=None,
        help=f"LoRA alpha; scaling = alpha / rank (default: {train.LORA_ALPHA:g}, "
        f"or {train.QUICK_LORA_ALPHA:g} with --quick)",
    )
    add("--epochs", type=POSITIVE_INT, default=None, help="epochs (default: 5, 1 with --quick)")
    defaults = ", ".join(f"{m} {lr:g}" for m, lr in train.DEFAULT_LR.items())
    add(
        "--lr",
        type=POSITIVE,
        default=None,
        help=f"AdamW learning rate (default: {defaults}; {train.QUICK_LR:g} with --quick)",
    )
    add("--weight-decay", type=NON_NEGATIVE, default=0.1, help="AdamW weight decay (%(default)s)")
    add("--batch-size", type=POSITIVE_INT, default=8, help="messages per step and process (8)")
    add("--max-steps", type=POSITIVE_INT, default=None, help="stop after this many steps")
    add(
        "--eval-every",
        type=POSITIVE_INT,
        default=None,
        help="steps between loss evaluations (default: 50, or 4 with --quick)",
    )
    add(
        "--pooling",
        default="last_real",
        choices=["last_real", "last"],
        help="which token's hidden state the head reads (%(default)s)",
    )
    add("--seed", type=_seed, default=123, help="seed for splits, initialisation, shuffling (123)")
    add(
        "--data-dir",
        type=Path,
        default=None,
        help="folder for SMSSpamCollection and the split CSVs, with their splits.json "
        "(default: <cache>/sms-spam-collection)",
    )
    add(
        "--output-dir",
        type=Path,
        default=Path("finetune-output"),
        help="new, empty, or a previous run's results (default: %(default)s)",
    )
    add("--device", default=None, help="cpu, cuda, mps ... (default: the best available)")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_device(name: str | None) -> str | None:
    """A problem with ``--device``, or None."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a device name; try cpu, cuda or mps"
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        return f"{name!r} is not available on this machine; leave --device out to pick the best"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, with the mode's defaults filled in; every check happens here, up front."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        env_mode = config.mode()
    except ValueError as err:
        parser.error(str(err))
    if (args.quick and env_mode == "rehearsal") or (args.rehearsal and env_mode == "quick"):
        parser.error(
            f"--{'quick' if args.quick else 'rehearsal'} and the environment ({env_mode} mode) "
            "ask for two modes; choose one"
        )
    flag = "quick" if args.quick else "rehearsal" if args.rehearsal else None
    args.mode = flag or env_mode
    args.quick, args.rehearsal = args.mode == "quick", args.mode == "rehearsal"
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    args.lr = args.lr if args.lr is not None else train.default_lr(args.method, quick=args.quick)
    args.alpha = args.alpha if args.alpha is not None else train.default_alpha(quick=args.quick)
    args.eval_every = args.eval_every if args.eval_every is not None else (4 if args.quick else 50)
    width = gpt.GPT_CONFIGS["tiny" if args.quick else args.model]["emb_dim"]
    if args.method == "lora" and args.rank > width:  # a rank above a layer's size adds nothing
        parser.error(f"--rank {args.rank} exceeds the model's layer width {width}; lower it")
    problem = _check_device(args.device)
    if problem:
        parser.error(f"--device: {problem}")
    try:
        output_folder.check(args.output_dir)
    except output_folder.OutputFolderError as err:
        parser.error(f"--output-dir: {err}")
    if args.data_dir is not None:
        for path in [args.data_dir, *args.data_dir.absolute().parents]:
            if path.exists() and not path.is_dir():
                parser.error(f"--data-dir: {path} is a file, not a folder")
        data_dir, out = args.data_dir.resolve(), args.output_dir.resolve()
        if data_dir == out or out in data_dir.parents:
            parser.error("--data-dir lies inside --output-dir, which each run replaces whole")
    return args
