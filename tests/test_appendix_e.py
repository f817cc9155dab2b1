"""Chapter 3's version of appendix E's first LoRA code computes what the original computes.

The original ships in the ``llms-from-scratch`` package (a test-only peer, installed without its
dependencies); the chapter writes its own version, and this test runs that notebook cell.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_tutorial import lora

try:
    import llms_from_scratch.appendix_e as appendix_e
except ImportError:
    if os.environ.get("CI"):  # CI installs it (.ci/run): a missing package there is a failure
        raise
    pytest.skip(
        "llms-from-scratch is not installed: pip install --no-deps llms-from-scratch==1.0.19",
        allow_module_level=True,
    )

CHAPTER = Path(__file__).resolve().parent.parent / "chapters" / "03_lora_from_scratch.ipynb"


@pytest.fixture(scope="module")
def first_edition() -> dict:
    """The names that chapter 3's cell ``ch3-first-edition`` defines."""
    cells = json.loads(CHAPTER.read_text())["cells"]
    (cell,) = [c for c in cells if c.get("id") == "ch3-first-edition"]
    namespace: dict = {"torch": torch, "nn": nn, "math": math}
    exec("".join(cell["source"]), namespace)
    return namespace


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_chapters_layer_draws_and_computes_what_appendix_e_does(first_edition, seed) -> None:
    torch.manual_seed(seed)
    ours = first_edition["FirstEditionLinearWithLoRA"](nn.Linear(32, 24), 4, 8)
    torch.manual_seed(seed)
    theirs = appendix_e.LinearWithLoRA(nn.Linear(32, 24), 4, 8)
    assert torch.equal(ours.lora.A, theirs.lora.A)  # same initialiser, same random draws
    assert torch.equal(ours.linear.weight, theirs.linear.weight)
    with torch.no_grad():
        ours.lora.B.normal_(generator=torch.Generator().manual_seed(seed))
        theirs.lora.B.copy_(ours.lora.B)
    x = torch.randn(5, 32)
    assert torch.equal(ours(x), theirs(x))


def test_appendix_e_equals_the_package_when_alpha_is_multiplied_by_the_rank() -> None:
    torch.manual_seed(0)
    base, rank, alpha_old = nn.Linear(48, 40), 8, 16
    theirs = appendix_e.LinearWithLoRA(base, rank, alpha_old)
    package = lora.LinearWithLoRA(base, rank, alpha=alpha_old * rank)
    with torch.no_grad():
        theirs.lora.B.normal_(std=0.05)
        package.lora.A.copy_(theirs.lora.A)
        package.lora.B.copy_(theirs.lora.B)
    x = torch.randn(6, 48)
    torch.testing.assert_close(package(x), theirs(x))
    unconverted = lora.LinearWithLoRA(base, rank, alpha=alpha_old)
    unconverted.load_state_dict(package.state_dict())
    assert not torch.allclose(unconverted(x), theirs(x))  # alpha carried over unchanged is wrong


def test_the_packages_replace_gives_appendix_e_trainable_count_on_the_2_class_classifier() -> None:
    """Appendix E's call, rank 16 on every linear layer including the 768->2 head."""
    from lora_tutorial import classify, gpt

    with torch.device("meta"):  # shapes only: counting needs no weights
        ours = classify.GPTClassifier(gpt.GPTModel("gpt2-small"), num_classes=2)
        theirs = classify.GPTClassifier(gpt.GPTModel("gpt2-small"), num_classes=2)
    for model in (ours, theirs):
        model.requires_grad_(False)
    with pytest.warns(UserWarning, match="exceeds"):
        lora.replace_linear_with_lora(ours, rank=16, alpha=16)
    appendix_e.replace_linear_with_lora(theirs, rank=16, alpha=16)
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert counts == [2_666_528, 2_666_528]
