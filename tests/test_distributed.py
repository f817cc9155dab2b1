"""The multi-process helpers, outside torchrun (the torchrun run itself is in test_finetune)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial.runtime import distributed


def test_outside_torchrun_there_is_one_process() -> None:
    with distributed.distributed() as info:
        assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
        assert distributed.dist_info() == info
        assert distributed.gather("x") == ["x"]


def test_one_process_trains_the_model_and_loader_as_given() -> None:
    model = nn.Linear(2, 2)
    info = distributed.dist_info()
    assert distributed.wrap_model(model, info, torch.device("cpu")) is model
    generator = torch.Generator()
    loader = DataLoader(TensorDataset(torch.arange(10)), 5, shuffle=True, generator=generator)
    first = [batch[0].tolist() for batch in distributed.shard_loader(loader, 7)[0]]
    sharded, sampler = distributed.shard_loader(loader, 7)
    assert sharded is loader and sampler is None
    assert [batch[0].tolist() for batch in sharded] == first  # reseeded: the same order again
