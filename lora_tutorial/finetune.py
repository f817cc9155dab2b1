"""Fine-tune GPT-2 to tell spam from ham: ``python -m lora_tutorial.finetune --help``.

One run reads and splits the SMS data, loads the pretrained model, adds the classification
head, adapts it with the chosen method, trains, evaluates on the test split and writes to
``--output-dir``:

- ``adapter.safetensors`` (``--method lora``): the LoRA matrices and the classification head,
  loadable with :func:`lora_tutorial.adapters.load_adapter` into ``GPTClassifier(GPTModel(...))``;
  ``weights.safetensors`` (``full`` or ``last-block``): every parameter that the method
  trained, under its name in the classifier;
- ``metrics.json``: the settings, parameter counts, training history, validation and test
  scores, time per epoch, peak memory, and a digest of the final weights from every process;
- ``loss.png`` and ``accuracy.png``: the training curves.

``--quick`` (or ``LORA_TUTORIAL_QUICK=1``) trains a tiny randomly initialised model on a few
messages: it checks that everything runs, needs no GPT-2 download, and takes seconds on a CPU.

Under ``torchrun --nproc_per_node=N -m lora_tutorial.finetune ...`` the same command trains
with ``DistributedDataParallel`` (``gloo`` on CPUs, ``nccl`` on GPUs); ``--batch-size`` is per
process, and only rank 0 downloads, prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib
import tiktoken
import torch.distributed as dist
from safetensors.torch import save_file

from lora_tutorial import adapters, config, data, download, gpt, lora, plots, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.distributed import DistInfo, distributed, gather
from lora_tutorial.files import atomic_write

PRETRAINED = [name for name in gpt.GPT_CONFIGS if name in download.KNOWN_FILES]
QUICK_SIZES = {"train": 96, "validation": 32, "test": 32}  # messages per split in quick mode


class MissingInput(RuntimeError):
    """Data, weights or tokenizer files are missing and cannot be downloaded."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's options, with the defaults that depend on quick mode filled in and checked."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_tutorial.finetune",
        description="Fine-tune GPT-2 to classify SMS messages as spam or ham, with LoRA or a baseline method.",
    )
    parser.add_argument(
        "--model",
        default="gpt2-small",
        choices=PRETRAINED,
        help="pretrained GPT-2 size (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random model, few messages and steps: a fast check that needs no download (also LORA_TUTORIAL_QUICK=1)",
    )
    parser.add_argument(
        "--method",
        default="lora",
        choices=train.METHODS,
        help="what to train (default: %(default)s)",
    )
    parser.add_argument(
        "--rank", type=int, default=train.LORA_RANK, help="LoRA rank (default: %(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"LoRA alpha; scaling = alpha / rank (default: {train.LORA_ALPHA:g}, or {train.QUICK_LORA_ALPHA:g} with --quick)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: 5, or 1 with --quick)"
    )
    defaults = ", ".join(f"{m} {lr:g}" for m, lr in train.DEFAULT_LR.items())
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"AdamW learning rate (default: the method's, {defaults}; {train.QUICK_LR:g} with --quick)",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="messages per step and process (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between loss evaluations (default: 50, or 4 with --quick)",
    )
    parser.add_argument(
        "--pooling",
        default="last_real",
        choices=["last_real", "last"],
        help="which token's hidden state the head reads (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=123,
        help="seed for splits, initialisation and shuffling (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder for SMSSpamCollection and the split CSVs (default: <cache>/sms-spam-collection)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("finetune-output"),
        help="where results are written (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, mps ... (default: the best available)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.quick = args.quick or config.is_quick()
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    args.lr = args.lr if args.lr is not None else train.default_lr(args.method, quick=args.quick)
    args.alpha = args.alpha if args.alpha is not None else train.default_alpha(quick=args.quick)
    args.eval_every = args.eval_every if args.eval_every is not None else (4 if args.quick else 50)
    for name in ("rank", "epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.method == "lora":
        try:
            lora.check_alpha(
                args.alpha
            )  # here, before data and weights are fetched, not deep inside training
        except ValueError as err:
            parser.error(f"--alpha: {err}")
    return args


def _main_first(info: DistInfo, step: Callable[[], object]) -> None:
    """Run ``step`` (a download, writing files) on rank 0 while the other processes wait."""
    if info.is_main:
        step()
    if info.world_size > 1:
        dist.barrier()


def _tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer, or MissingInput saying where to put its files when it cannot be loaded."""
    try:
        return gpt.get_tokenizer()
    except Exception as err:  # tiktoken raises requests' errors when it cannot download offline
        raise MissingInput(
            f"the GPT-2 tokenizer files could not be loaded ({type(err).__name__}: {err}). Offline, put encoder.json "
            f"and vocab.bpe into <data>/gpt2-bpe/ and point {config.DATA_ENV} at <data>."
        ) from None


def _splits(args: argparse.Namespace, info: DistInfo) -> data.Splits:
    folder = args.data_dir if args.data_dir is not None else config.cache_dir() / data.SHARED_FOLDER
    _main_first(
        info, lambda: data.prepare_splits(folder, seed=args.seed, progress=not args.no_progress)
    )
    splits = data.load_splits(folder)
    if args.quick:
        splits = data.Splits(
            *(
                data.subset(df, QUICK_SIZES[name], seed=args.seed)
                for name, df in zip(data.SPLIT_NAMES, splits)
            )
        )
    return splits


def _backbone(args: argparse.Namespace, info: DistInfo) -> gpt.GPTModel:
    if args.quick:
        return gpt.GPTModel("tiny")
    _main_first(
        info, lambda: download.fetch(args.model, progress=info.is_main and not args.no_progress)
    )
    return gpt.load_gpt2(args.model, progress=False)


def _save_weights(model: GPTClassifier, method: str, folder: Path) -> tuple[Path, str]:
    """Write what the method trained; return the path and a description for metrics.json."""
    if method == "lora":
        path = adapters.save_adapter(
            model, folder / "adapter.safetensors", extra_modules=train.HEAD
        )
        return (
            path,
            f"LoRA matrices and the classification head ({train.HEAD}); load with adapters.load_adapter",
        )
    path = folder / "weights.safetensors"
    tensors = {
        name: t.to("cpu", copy=True).contiguous()
        for name, t in train.trainable_state_dict(model).items()
    }
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"method": method})
    return (
        path,
        f"every parameter trained by --method {method}, by name in GPTClassifier (load_state_dict(strict=False))",
    )


def _write_json(path: Path, content: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def run(args: argparse.Namespace, info: DistInfo) -> dict:
    """One fine-tuning run with parsed ``args``; returns the metrics (written by rank 0)."""
    device = info.device(args.device)
    show = info.is_main and not args.no_progress
    if info.is_main:
        what = (
            "a tiny random model on a few messages (quick mode: checks that it runs)"
            if args.quick
            else args.model
        )
        print(
            f"Fine-tuning {what} with --method {args.method} on {device}, {info.world_size} process(es)"
        )
    splits = _splits(args, info)
    tokenizer = _tokenizer()
    train.set_seed(
        args.seed
    )  # the same tiny model, head and LoRA matrices on every run and process
    model = GPTClassifier(_backbone(args, info), pooling=args.pooling)
    train.prepare_model(model, args.method, rank=args.rank, alpha=args.alpha)
    loaders = data.make_loaders(
        *splits,
        tokenizer,
        batch_size=args.batch_size,
        seed=args.seed,
        context_length=model.context_length,
    )
    history = train.train_classifier(
        model,
        loaders.train,
        loaders.validation,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        max_steps=args.max_steps,
        device=device,
        seed=args.seed,
        progress=show,
    )
    validation = train.evaluate(model, loaders.validation, device=device)
    test = train.evaluate(model, loaders.test, device=device)
    digests = gather(train.weights_digest(model))
    result = train.summarize(args.method, model, history, test)
    metrics = {
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": "tiny (random init)" if args.quick else args.model,
        },
        "device": str(device),
        "world_size": info.world_size,
        "examples": {name: len(df) for name, df in zip(data.SPLIT_NAMES, splits)},
        "max_length": loaders.train.dataset.max_length,
        "summary": result.to_dict(),
        "validation": asdict(validation),
        "test": asdict(test),
        "history": history.to_dict(),
        "weights_digest_per_rank": digests,
    }
    if info.is_main:
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        weights, contents = _save_weights(model, args.method, out)
        metrics["weights"] = {"file": weights.name, "contents": contents}
        for name, plot in (("loss.png", plots.plot_losses), ("accuracy.png", plots.plot_accuracy)):
            plots.plt.close(plot(history, path=out / name))
        _write_json(out / "metrics.json", metrics)
        print(
            f"test accuracy {test.accuracy:.1%} (validation {validation.accuracy:.1%}); "
            f"{result.trainable_params:,} of {result.total_params:,} parameters trained; results in {out}"
        )
        if len(set(digests)) > 1:
            print(
                f"warning: the processes ended with different weights: {digests}", file=sys.stderr
            )
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (1, with advice on stderr, when inputs are missing)."""
    args = parse_args(argv)
    matplotlib.use("Agg")  # files only, no windows
    try:
        with distributed() as info:
            run(args, info)
    except (download.DownloadError, MissingInput, FileNotFoundError) as err:
        hint = "" if args.quick else "\nTo try the pipeline without GPT-2 weights, add --quick."
        print(f"python -m lora_tutorial.finetune: cannot start: {err}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
