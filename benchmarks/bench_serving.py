"""Time serving a mixed batch of requests for many LoRA adapters on one base model.

Three strategies answer the same batch (each request its own task, round-robin over the tasks):

- batched multi-adapter: ``serving.MultiAdapterModel``, one forward pass;
- merge per request: merge the request's adapter into the weights, run it, unmerge;
- one merged model per task: a merged copy per task, the batch split by task.

Prints each strategy's median time as a ratio to the batched pass, measured in one interleaved
run (``serving.time_interleaved``), the weights each keeps, and the largest difference of its
outputs to the batched pass. GPT-2 small's shapes with random weights (nothing is downloaded).

    python benchmarks/bench_serving.py [--model gpt2-small|tiny] [--tasks 8] [--batch 16]
        [--tokens 64] [--rank 16] [--rounds 7] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy

import torch

from lora_tutorial import serving, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPTModel
from lora_tutorial.runtime import config


def adapted_models(base: GPTClassifier, tasks: int, rank: int) -> list[GPTClassifier]:
    """``tasks`` copies of ``base``, LoRA on all linear layers, random (trained-looking) factors."""
    models = []
    for task in range(tasks):
        model = train.prepare_model(copy.deepcopy(base), "lora", rank=rank, alpha=2 * rank)
        g = torch.Generator().manual_seed(task)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".lora.B"):  # B starts at zero: make the update nonzero
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                elif name == f"{train.HEAD}.weight":
                    p.copy_(torch.randn(p.shape, generator=g))
        models.append(model.eval())
    return models


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "tiny"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = config.get_device(args.device)
    torch.manual_seed(0)
    base = GPTClassifier(GPTModel(args.model)).eval().to(device)
    adapted = [m.to(device) for m in adapted_models(base, args.tasks, args.rank)]
    served = serving.MultiAdapterModel(base, adapted, extra_modules=train.HEAD).eval()
    merged = serving.merged_copies(adapted)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 50257, (args.batch, args.tokens), generator=g).to(device)
    lengths = torch.full((args.batch,), args.tokens, device=device)
    ids = [i % args.tasks for i in range(args.batch)]
    strategies = {
        "batched multi-adapter": lambda: served(input_ids, lengths, adapter_ids=ids),
        "merge per request": lambda: serving.forward_merging_per_request(
            adapted, input_ids, lengths, adapter_ids=ids
        ),
        "one merged model per task": lambda: serving.forward_per_task_models(
            merged, input_ids, lengths, adapter_ids=ids
        ),
    }
    held = {
        "batched multi-adapter": weights_bytes(served),
        "merge per request": weights_bytes(base),
        "one merged model per task": sum(weights_bytes(m) for m in merged),
    }
    with torch.no_grad():
        outputs = {name: fn() for name, fn in strategies.items()}
        seconds = serving.time_interleaved(strategies, rounds=args.rounds, device=device)
    reference = seconds["batched multi-adapter"]
    print(
        f"{args.model}, {args.tasks} tasks, rank {args.rank}, {args.batch} requests of "
        f"{args.tokens} tokens, device {device}, median of {args.rounds} interleaved rounds"
    )
    print(f"{'strategy':28} {'time / batched':>15} {'weights (MB)':>13} {'max diff':>10}")
    for name, value in seconds.items():
        diff = (outputs[name] - outputs["batched multi-adapter"]).abs().max().item()
        print(f"{name:28} {value / reference:15.2f} {held[name] / 1e6:13.1f} {diff:10.1e}")


if __name__ == "__main__":
    main()
