"""Time LinearWithLoRA against PEFT's LoRA Linear, and merged against unmerged and plain nn.Linear.

Prints ratios measured in this run (ours / PEFT, and each variant / plain nn.Linear), at GPT-2's
linear shapes with a batch of 8 x 120 tokens. Candidates are timed in interleaved rounds and each
is summarised by its median, so that load from other processes hits all of them alike.

    python benchmarks/bench_lora.py [--rank 8] [--rounds 15] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_tutorial.lora import LinearWithLoRA

SHAPES = [(768, 768), (768, 3072), (3072, 768)]
BATCH, TOKENS = 8, 120


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds after a warm-up."""
    per_round = 5 if device.type == "cpu" else 50
    for fn in fns.values():  # warm-up: allocator, kernels, autograd graph caches
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(s) for name, s in samples.items()}


def peft_lora_linear(linear: nn.Linear, rank: int, alpha: float) -> nn.Module:
    """PEFT's LoRA Linear around a copy of ``linear`` (frozen base, trainable A and B)."""
    holder = nn.Module()
    holder.fc = copy.deepcopy(linear)
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"]))
    return model.base_model.model.fc


def train_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    return step


def infer(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return layer(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"device={device}, threads={torch.get_num_threads()}, rank={args.rank}, "
        f"alpha={args.alpha}, "
        f"batch={BATCH}x{TOKENS} tokens, float32, {args.rounds} interleaved rounds, medians"
    )

    print("\nforward+backward (base frozen, A and B trainable)")
    print(f"{'shape':>12} {'ours ms':>9} {'PEFT ms':>9} {'ours/PEFT':>10}")
    for d_in, d_out in SHAPES:
        linear = nn.Linear(d_in, d_out).to(device).requires_grad_(False)
        ours = LinearWithLoRA(copy.deepcopy(linear), args.rank, args.alpha)
        peft = peft_lora_linear(linear, args.rank, args.alpha)
        for layer in (ours, peft):  # nonzero B, as after some training
            for p in layer.parameters():
                if p.requires_grad:
                    nn.init.normal_(p, std=0.02)
        x = torch.randn(BATCH, TOKENS, d_in, device=device)
        t = time_interleaved(
            {"ours": train_step(ours, x), "peft": train_step(peft, x)}, device, args.rounds
        )
        print(
            f"{d_in:>5}->{d_out:<5} {t['ours'] * 1e3:9.3f} {t['peft'] * 1e3:9.3f} "
            f"{t['ours'] / t['peft']:10.3f}"
        )

    print("\ninference (torch.inference_mode), relative to a plain nn.Linear of the same shape")
    print(f"{'shape':>12} {'plain ms':>9} {'merged/plain':>13} {'unmerged/plain':>15}")
    for d_in, d_out in SHAPES:
        plain = nn.Linear(d_in, d_out).to(device).requires_grad_(False)
        unmerged = LinearWithLoRA(copy.deepcopy(plain), args.rank, args.alpha)
        nn.init.normal_(unmerged.lora.B, std=0.02)
        merged = copy.deepcopy(unmerged)
        merged.merge()
        x = torch.randn(BATCH, TOKENS, d_in, device=device)
        fns = {"plain": infer(plain, x), "merged": infer(merged, x), "unmerged": infer(unmerged, x)}
        t = time_interleaved(fns, device, args.rounds)
        print(
            f"{d_in:>5}->{d_out:<5} {t['plain'] * 1e3:9.3f} {t['merged'] / t['plain']:13.3f} "
            f"{t['unmerged'] / t['plain']:15.3f}"
        )


if __name__ == "__main__":
    main()
