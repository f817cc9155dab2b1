"""The checks of the exercises that make a learner build and measure (issue 14): right answers pass,
typical mistakes fail with a hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tutorial.exercises import ch01, ch03, ch07


def verdict(capsys: pytest.CaptureFixture[str], check, answer) -> tuple[bool, str]:
    ok = check(answer)
    return ok, capsys.readouterr().out


def subspace_similarity(A1, A2, i, j):
    U1 = torch.linalg.svd(A1, full_matrices=False).U[:, :i]
    U2 = torch.linalg.svd(A2, full_matrices=False).U[:, :j]
    return ((U1.T @ U2).square().sum() / min(i, j)).item()


def test_subspace_similarity(capsys) -> None:
    assert verdict(capsys, ch01.check_subspace_similarity, subspace_similarity)[0]
    unnormalised = lambda A1, A2, i, j: subspace_similarity(A1, A2, i, j) * min(i, j)
    ok, out = verdict(capsys, ch01.check_subspace_similarity, unnormalised)
    assert not ok and "min(i, j)" in out
    on_columns = lambda A1, A2, i, j: float((A1[:, :i].T @ A2[:, :j]).square().sum() / min(i, j))
    assert not verdict(capsys, ch01.check_subspace_similarity, on_columns)[0]


class EmbeddingWithLoRA(nn.Module):
    def __init__(self, embedding, rank, alpha):
        super().__init__()
        self.embedding = embedding.requires_grad_(False)
        self.A = nn.Parameter(torch.zeros(embedding.num_embeddings, rank))
        self.B = nn.Parameter(torch.randn(rank, embedding.embedding_dim))
        self.scaling = alpha / rank

    def forward(self, ids):
        return self.embedding(ids) + self.scaling * self.A[ids] @ self.B


def test_embedding_lora(capsys) -> None:
    assert verdict(capsys, ch03.check_embedding_lora, EmbeddingWithLoRA)[0]

    class Unfrozen(EmbeddingWithLoRA):
        def __init__(self, embedding, rank, alpha):
            super().__init__(embedding, rank, alpha)
            embedding.requires_grad_(True)

    ok, out = verdict(capsys, ch03.check_embedding_lora, Unfrozen)
    assert not ok and "freeze" in out

    class BothRandom(EmbeddingWithLoRA):
        def __init__(self, embedding, rank, alpha):
            super().__init__(embedding, rank, alpha)
            nn.init.normal_(self.A)

    ok, out = verdict(capsys, ch03.check_embedding_lora, BothRandom)
    assert not ok and "start" in out

    class Unscaled(EmbeddingWithLoRA):
        def forward(self, ids):
            return self.embedding(ids) + self.A[ids] @ self.B

    assert not verdict(capsys, ch03.check_embedding_lora, Unscaled)[0]


def test_pissa_to_lora(capsys) -> None:
    right = lambda A, B, A0, B0: (torch.cat([A, A0], 1), torch.cat([B, -B0], 0))
    assert verdict(capsys, ch07.check_pissa_to_lora, right)[0]
    wrong_sign = lambda A, B, A0, B0: (torch.cat([A, A0], 1), torch.cat([B, B0], 0))
    ok, out = verdict(capsys, ch07.check_pissa_to_lora, wrong_sign)
    assert not ok and "sign" in out
    same_rank = lambda A, B, A0, B0: (A, B)
    ok, out = verdict(capsys, ch07.check_pissa_to_lora, same_rank)
    assert not ok and "rank" in out
