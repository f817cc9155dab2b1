"""Training and evaluating the classifier, the three fine-tuning methods, and several processes.

- :func:`prepare_model` freezes and adapts a :class:`~lora_tutorial.classify.GPTClassifier`
  for one method: ``"lora"``, ``"full"`` or ``"last-block"``.
- :func:`default_lr` (``DEFAULT_LR``, ``QUICK_LR``), ``LORA_RANK`` and :func:`default_alpha`: the
  default settings that the chapters and the command line share.
- :func:`train_classifier` runs AdamW (or an optimizer you build) and returns a :class:`History` that chapters plot.
- :func:`evaluate` gives accuracy, loss, confusion matrix, precision and recall.
- :func:`distributed` sets up a process group when the script runs under ``torchrun``;
  :func:`train_classifier` then trains with ``DistributedDataParallel``.

Batches are ``(input_ids, labels, lengths)`` as :class:`~lora_tutorial.data.SpamDataset` yields.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from lora_tutorial import lora
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.distributed import _dist_info, gather
from lora_tutorial.memory import PeakMemory

METHODS = ("lora", "full", "last-block")

# Default AdamW learning rates in full mode (GPT-2), shared by the chapters and the command line.
# LoRA gets ten times the rate of the other methods, as is usual: full and last-block fine-tuning
# move pretrained weights, which large steps would damage (5e-5, as chapter 6 of LLMs-from-scratch
# uses), while LoRA's update starts at zero (B = 0) and grows as the product of two small matrices,
# so at that rate it changes the model far more slowly. Hu et al. (2021) trained LoRA with 2e-4 on
# GPT-2 and 4e-4 to 5e-4 on RoBERTa.
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "last-block": 5e-5}
QUICK_LR = (
    1e-3  # quick mode, every method: a tiny random model needs large steps to move in a few batches
)

# LoRA's default rank and alpha in full mode (scaling alpha / rank = 2). Under AdamW the scaling, like
# the learning rate, sets how fast the update grows. Appendix E of LLMs-from-scratch multiplied its
# rank-16 update by alpha = 16 itself and drew A about 7x larger than our PEFT-style init, so its update
# started out much faster than ours even at a tenth of our rate. alpha = 2 * rank narrows that gap for a
# 5-epoch budget and stays within the LoRA authors' settings (their scripts: RoBERTa-base rank 8,
# alpha 16; GPT-2 rank 4, alpha 32). Quick mode keeps alpha = rank: its tiny random model already
# trains at QUICK_LR, and with a doubled scaling chapter 7's quick LoRA+ run ended at chance accuracy.
LORA_RANK, LORA_ALPHA, QUICK_LORA_ALPHA = 16, 32, 16

# The linear layers of a transformer block: attention projections and the feed-forward pair.
LORA_TARGETS = ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")
HEAD = "gpt.out_head"  # the classification head's name in a GPTClassifier


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}; pick one of those names")


def default_lr(method: str, *, quick: bool) -> float:
    """The default learning rate of ``method``: ``DEFAULT_LR[method]``, or ``QUICK_LR`` when ``quick``."""
    _check_method(method)
    return QUICK_LR if quick else DEFAULT_LR[method]


def default_alpha(*, quick: bool) -> float:
    """LoRA's default alpha: ``LORA_ALPHA``, or ``QUICK_LORA_ALPHA`` when ``quick``."""
    return QUICK_LORA_ALPHA if quick else LORA_ALPHA


# --- choosing what to train --------------------------------------------------------------------


def prepare_model(
    model: GPTClassifier,
    method: str,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: tuple[str, ...] = LORA_TARGETS,
    dropout: float = 0.0,
) -> GPTClassifier:
    """Freeze and adapt ``model`` in place for ``method``; returns it.

    - ``"lora"``: the linear layers whose names end with one of ``targets`` (patterns as in
      :func:`~lora_tutorial.lora.replace_linear_with_lora`) become :class:`~lora_tutorial.lora.LinearWithLoRA` (rank, alpha); only the LoRA
      matrices and the new classification head are trained.
    - ``"full"``: every weight is trained.
    - ``"last-block"``: the last transformer block, the final norm and the head are trained.

    The head is always trained: it is new and starts from random weights.
    """
    _check_method(method)
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "last-block":
        model.requires_grad_(False)
        for module in (model.gpt.trf_blocks[-1], model.gpt.final_norm, model.gpt.out_head):
            module.requires_grad_(True)
        return model
    if not targets:
        raise ValueError(
            "targets is empty: name at least one linear layer for LoRA, e.g. ('W_query', 'W_value')"
        )
    lora.replace_linear_with_lora(
        model, rank, alpha, include=list(targets), exclude=HEAD, dropout=dropout
    )
    lora.mark_only_lora_as_trainable(model, extra_modules=HEAD)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are trained, by name (what a run of a method changes)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, by name: equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


# --- evaluation --------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Scores of a classifier on a loader. ``confusion[i][j]``: true class ``i`` predicted as ``j``."""

    accuracy: float
    loss: float
    confusion: list[list[int]]
    precision: list[float]  # per class; 0.0 for a class never predicted
    recall: list[float]  # per class; 0.0 for a class never present
    examples: int


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU with native bf16 (compute capability 8.0+: A100, L4, H100); float32 elsewhere.

    Older GPUs such as Colab's T4 (7.5) only emulate bf16, which gains nothing there, so they
    train in float32. (``torch.cuda.is_bf16_supported()`` says True for them: it counts emulation.)
    """
    use_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def batch_loss(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of one ``(input_ids, labels, lengths)`` batch; returns ``(loss, logits)``."""
    input_ids, labels, lengths = (t.to(device) for t in batch)
    with autocast(device):
        logits = model(input_ids, lengths)
    return nn.functional.cross_entropy(logits.float(), labels), logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | None = None,
    num_batches: int | None = None,
) -> Evaluation:
    """Accuracy, mean loss, confusion matrix and per-class precision/recall on ``loader``.

    ``num_batches`` limits the evaluation to the first batches (a quick estimate).
    """
    model = _unwrap(model)
    device = device or next(model.parameters()).device
    num_classes = model.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, examples = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            loss, logits = batch_loss(model, batch, device)
            labels = batch[1]
            predicted = logits.argmax(dim=-1).cpu()
            confusion += torch.bincount(
                labels * num_classes + predicted, minlength=num_classes**2
            ).view(num_classes, -1)
            total_loss += loss.item() * len(labels)
            examples += len(labels)
    finally:
        model.train(was_training)
    if examples == 0:
        raise ValueError("the loader gave no examples to evaluate (empty data or num_batches=0)")
    correct = confusion.diag()
    predicted_counts, true_counts = confusion.sum(dim=0), confusion.sum(dim=1)
    return Evaluation(
        accuracy=correct.sum().item() / examples,
        loss=total_loss / examples,
        confusion=confusion.tolist(),
        precision=[
            c / p if p else 0.0 for c, p in zip(correct.tolist(), predicted_counts.tolist())
        ],
        recall=[c / t if t else 0.0 for c, t in zip(correct.tolist(), true_counts.tolist())],
        examples=examples,
    )


# --- training ----------------------------------------------------------------------------------


@dataclass
class History:
    """What a training run recorded, for plots and reports.

    Losses are recorded every ``eval_every`` optimizer steps: ``train_losses`` is the mean loss
    of the training batches since the previous record, ``val_losses`` the loss on the first
    ``eval_batches`` validation batches. Accuracies are per epoch. ``epoch_seconds`` is the
    training time of each epoch without those evaluations. ``examples_seen`` counts messages
    over all processes.
    """

    steps: list[int] = field(default_factory=list)
    examples_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_measure: str = ""
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def set_seed(seed: int) -> None:
    """Seed PyTorch's generators (CPU and every GPU) so a run can be repeated."""
    torch.manual_seed(seed)


def _train_loader(loader: DataLoader, seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The training loader, reseeded; under DDP, the same data sharded with a DistributedSampler."""
    if not dist.is_initialized():
        if loader.generator is not None:
            loader.generator.manual_seed(seed)
        return loader, None
    sampler = DistributedSampler(loader.dataset, shuffle=True, seed=seed, drop_last=True)
    sharded = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
    )
    return sharded, sampler


def train_classifier(
    model: GPTClassifier,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int = 5,
    lr: float = DEFAULT_LR["full"],
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_batches: int | None = 5,
    accuracy_batches: int | None = None,
    max_steps: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 123,
    progress: bool = True,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> History:
    """Train the parameters of ``model`` that require gradients; return the history.

    The optimizer is AdamW(``lr``, ``weight_decay``) over those parameters, or whatever
    ``make_optimizer(model)`` returns (then ``lr`` and ``weight_decay`` are not used), e.g.
    ``make_optimizer=lambda m: variants.create_loraplus_optimizer(m, lr=1e-4)`` for LoRA+.
    It is called after the model has moved to ``device``. The default ``lr`` suits full fine-tuning;
    pass :func:`default_lr` of the method you prepared (LoRA wants a larger rate).

    Seeds PyTorch and the training loader's shuffle with ``seed``, so the same call gives the
    same result. Per epoch, accuracy is measured on the first ``accuracy_batches`` batches of
    the training and validation loaders (all of them when None). ``max_steps`` stops early
    (quick runs). On a CUDA GPU with native bf16 the forward pass runs under bf16 :func:`autocast`.

    Inside :func:`distributed` with several processes, the model is wrapped in
    ``DistributedDataParallel`` and each process trains on its shard of the training set
    (``batch_size`` messages per process and step); only rank 0 shows progress.
    """
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs={epochs}, eval_every={eval_every}: both must be at least 1")
    if make_optimizer is not None and not callable(make_optimizer):
        raise TypeError(
            f"make_optimizer must be a function model -> optimizer, got {type(make_optimizer).__name__}; "
            "e.g. make_optimizer=lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "no parameter requires a gradient; call prepare_model(model, method) first"
        )
    info = _dist_info()
    device = info.device(
        None if device is None else str(device)
    )  # under torchrun: this process's own GPU
    set_seed(seed)
    model.to(device)
    net: nn.Module = model
    if info.world_size > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader, sampler = _train_loader(train_loader, seed)
    if make_optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = make_optimizer(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"make_optimizer(model) returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
    history = History(world_size=info.world_size)
    step, seen, window = 0, 0, []
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            epoch_start, eval_seconds = time.perf_counter(), 0.0
            net.train()
            bar = tqdm(
                loader,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not (progress and info.is_main),
                leave=False,
            )
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                loss, _ = batch_loss(net, batch, device)
                loss.backward()
                optimizer.step()
                step += 1
                seen += len(batch[1]) * info.world_size
                window.append(loss.item())
                done = max_steps is not None and step >= max_steps
                if step % eval_every == 0 or done:
                    eval_start = time.perf_counter()
                    train_loss = sum(window) / len(window)
                    if info.world_size > 1:
                        train_loss = sum(gather(train_loss)) / info.world_size
                    history.steps.append(step)
                    history.examples_seen.append(seen)
                    history.train_losses.append(train_loss)
                    history.val_losses.append(
                        evaluate(model, val_loader, device=device, num_batches=eval_batches).loss
                    )
                    window = []
                    eval_seconds += time.perf_counter() - eval_start
                    bar.set_postfix(
                        train_loss=f"{train_loss:.3f}", val_loss=f"{history.val_losses[-1]:.3f}"
                    )
                if done:
                    break
            history.epoch_seconds.append(time.perf_counter() - epoch_start - eval_seconds)
            train_acc = evaluate(
                model, train_loader, device=device, num_batches=accuracy_batches
            ).accuracy
            val_acc = evaluate(
                model, val_loader, device=device, num_batches=accuracy_batches
            ).accuracy
            history.train_accuracy.append(train_acc)
            history.val_accuracy.append(val_acc)
            if progress and info.is_main:
                tqdm.write(
                    f"epoch {epoch + 1}: train accuracy {train_acc:.1%}, validation accuracy {val_acc:.1%}"
                )
            if max_steps is not None and step >= max_steps:
                break
    history.elapsed_seconds = time.perf_counter() - start
    history.peak_memory_bytes = memory.peak_bytes
    history.memory_measure = memory.measure
    return history


# --- comparing methods -------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's row in a comparison table."""

    method: str
    trainable_params: int
    total_params: int
    seconds_per_epoch: float
    peak_memory_bytes: int
    memory_measure: str
    val_accuracy: float
    test_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    method: str, model: nn.Module, history: History, test: Evaluation | None = None
) -> MethodResult:
    """The comparison row for a trained model: parameters, time per epoch, peak memory, accuracy."""
    counts = lora.count_parameters(_unwrap(model))
    return MethodResult(
        method=method,
        trainable_params=counts.trainable,
        total_params=counts.total,
        seconds_per_epoch=sum(history.epoch_seconds) / max(len(history.epoch_seconds), 1),
        peak_memory_bytes=history.peak_memory_bytes,
        memory_measure=history.memory_measure,
        val_accuracy=history.val_accuracy[-1] if history.val_accuracy else float("nan"),
        test_accuracy=test.accuracy if test is not None else None,
    )
