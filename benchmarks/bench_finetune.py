"""Time and memory of one fine-tuning step: LoRA against full fine-tuning, and against PEFT's LoRA.

Three candidates, each a GPT-2 small (124M) shaped spam classifier with random weights (timing
does not need pretrained ones), trained with AdamW on batches of 8 x 120 tokens:

- ``full``: our GPTClassifier, every weight trained;
- ``lora``: our GPTClassifier, LoRA rank 16 on all linear layers of the blocks, head trained;
- ``peft``: transformers' GPT2ForSequenceClassification with PEFT's LoRA, rank 16 on all its
  linear layers (``c_attn``, ``c_proj``, ``c_fc``), head trained (PEFT's ``modules_to_save``).
  GPT-2 on Hugging Face fuses query, key and value into one ``c_attn`` layer, so PEFT trains one
  rank-16 update there where ours trains three; the table shows both parameter counts.

Each candidate runs in its own fresh process, so that peak memory is its own: on CPU the peak
resident memory (RSS) of that process during the timed steps, on CUDA ``max_memory_allocated``.
Time per step is the median of ``--steps`` steps after two warm-up steps. Results are printed as
ratios against full fine-tuning (and ours against PEFT) measured in the same run.

    python benchmarks/bench_finetune.py [--steps 10] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lora_tutorial import counting, gpt, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.runtime import config

CANDIDATES = ("full", "lora", "peft")
BATCH, TOKENS, RANK, ALPHA = 8, 120, 16, 16


def build(candidate: str, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """The model and a function ``loss(input_ids, labels, lengths)`` for one candidate."""
    if candidate == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2ForSequenceClassification

        hf = GPT2ForSequenceClassification(GPT2Config(num_labels=2, pad_token_id=50256))
        model = get_peft_model(
            hf,
            LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                target_modules=["c_attn", "c_proj", "c_fc"],
                task_type="SEQ_CLS",
            ),
        ).to(device)

        def loss(ids, labels, lengths):
            mask = torch.arange(ids.shape[1], device=device) < lengths[:, None]
            return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss

        return model, loss
    model = train.prepare_model(
        GPTClassifier(gpt.GPTModel("gpt2-small")), candidate, rank=RANK, alpha=ALPHA
    ).to(device)
    return model, lambda ids, labels, lengths: torch.nn.functional.cross_entropy(
        model(ids, lengths).float(), labels
    )


def measure(candidate: str, steps: int, device: torch.device) -> dict:
    """Run warm-up and timed steps of one candidate in this process; return its numbers."""
    torch.manual_seed(0)
    model, loss_fn = build(candidate, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 50257, (BATCH, TOKENS), device=device)
    lengths = torch.randint(TOKENS // 4, TOKENS + 1, (BATCH,), device=device)
    ids[torch.arange(TOKENS, device=device) >= lengths[:, None]] = 50256
    labels = torch.randint(0, 2, (BATCH,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with train.autocast(device):
            loss = loss_fn(ids, labels, lengths)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(2):
        step()
    times = []
    with counting.PeakMemory(device) as peak:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {
        "candidate": candidate,
        "seconds_per_step": statistics.median(times),
        "peak_memory_bytes": peak.peak_bytes,
        "memory_measure": peak.measure,
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per candidate (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--worker", choices=CANDIDATES, help=argparse.SUPPRESS
    )  # one candidate, JSON out
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = config.get_device(args.device)
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, device)))
        return

    print(
        f"batch {BATCH} x {TOKENS} tokens, gpt2-small shapes, LoRA rank {RANK} alpha {ALPHA}, "
        f"device {device}, {args.steps} timed steps per candidate, torch {torch.__version__}"
    )
    results = {}
    for candidate in CANDIDATES:
        command = [
            sys.executable,
            __file__,
            "--worker",
            candidate,
            "--steps",
            str(args.steps),
            "--device",
            str(device),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[candidate] = json.loads(out.strip().splitlines()[-1])
    full, ours, peft = (results[c] for c in CANDIDATES)
    print(f"memory measured as: {full['memory_measure']}\n")
    header = ("candidate", "trainable", "s/step", "peak MiB", "time/full", "mem/full")
    print(
        f"{header[0]:<10}{header[1]:>14}{header[2]:>10}{header[3]:>10}{header[4]:>11}{header[5]:>10}"
    )
    for r in results.values():
        seconds, peak = r["seconds_per_step"], r["peak_memory_bytes"]
        print(
            f"{r['candidate']:<10}{r['trainable_params']:>14,}{seconds:>10.3f}{peak / 2**20:>10.0f}"
            f"{seconds / full['seconds_per_step']:>11.2f}{peak / full['peak_memory_bytes']:>10.2f}"
        )
    time_ratio = ours["seconds_per_step"] / full["seconds_per_step"]
    memory_ratio = ours["peak_memory_bytes"] / full["peak_memory_bytes"]
    print(
        f"\nours lora / full: time {time_ratio:.2f} (aim <= 0.6), "
        f"memory {memory_ratio:.2f} (aim <= 0.8)"
    )
    peft_ratio = ours["seconds_per_step"] / peft["seconds_per_step"]
    print(f"ours lora / peft lora: time {peft_ratio:.2f} (aim <= 1.0)")


if __name__ == "__main__":
    main()
