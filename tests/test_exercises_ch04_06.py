"""The exercise checks of chapters 4-6 accept the solutions and reject the typical mistakes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lora_tutorial import data, lora, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises import ch04, ch05, ch06
from lora_tutorial.gpt import GPT_CONFIGS, GPTModel

# --- chapter 4: repeated messages ---------------------------------------------------------------


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    key = frame["Text"].map(lambda text: " ".join(text.split()).lower())
    return frame[~key.duplicated()]


def test_dedupe_check_accepts_the_solution_and_the_package(capsys) -> None:
    assert ch04.check_dedupe(_dedupe)
    assert "drops 415 of 5,574" in capsys.readouterr().out
    assert ch04.check_dedupe(data.drop_duplicates)


def _mutating_dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    frame["Text"] = frame["Text"].str.lower()
    return _dedupe(frame)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda f: f.drop_duplicates("Text"), "lower case"),
        (lambda f: f[~f["Text"].str.lower().duplicated()], "whitespace"),
        (lambda f: f[~f["Text"].str.lower().str.strip().duplicated()], "whitespace"),
        (lambda f: _dedupe(f).reset_index(drop=True), "index"),
        (lambda f: _dedupe(f).iloc[::-1], "order"),
        (
            lambda f: f[~f["Text"].map(lambda t: " ".join(t.split()).lower()).duplicated("last")],
            "first",
        ),
        (
            lambda f: f[
                ~f["Text"]
                .str.replace(r"[^\w\s]", "", regex=True)
                .map(lambda t: " ".join(t.split()).lower())
                .duplicated()
            ],
            "different message",
        ),
        (_mutating_dedupe, "changed the DataFrame"),
        (lambda f: _dedupe(f)["Text"], "DataFrame, not Series"),
        (lambda f: 1 / 0, "ZeroDivisionError"),
    ],
    ids=[
        "exact",
        "lower-only",
        "strip-only",
        "reset-index",
        "reordered",
        "keeps-last",
        "drops-punctuation",
        "mutates",
        "series",
        "raises",
    ],
)
def test_dedupe_check_rejects_typical_mistakes(wrong, message: str, capsys) -> None:
    assert not ch04.check_dedupe(wrong)
    out = capsys.readouterr().out
    assert "Not yet" in out and message in out


def test_dedupe_check_runs_on_the_whole_collection(capsys) -> None:
    """Right on the eight examples, wrong on the real data (it also drops a real message)."""
    assert not ch04.check_dedupe(lambda f: _dedupe(f).iloc[: 5 if len(f) == 8 else -1])
    assert "you drop 416 rows" in capsys.readouterr().out


# --- chapter 4: leaks ---------------------------------------------------------------------------


def _count_leaks(train: pd.DataFrame, other: pd.DataFrame) -> int:
    seen = set(train["Text"].map(lambda text: " ".join(text.split()).lower()))
    return int(other["Text"].map(lambda text: " ".join(text.split()).lower()).isin(seen).sum())


def test_count_leaks_check_accepts_the_solution_and_reports_seed_7(capsys) -> None:
    assert ch04.check_count_leaks(_count_leaks)
    out = capsys.readouterr().out
    naive = data.appendix_e_split(data.read_messages(), seed=7)
    assert f"with seed 7, {data.overlap(naive.train, naive.test)} of appendix E's 300" in out
    assert ch04.check_count_leaks(data.overlap)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda a, b: _count_leaks(a, b) * 1.0, "return an int, not float"),
        (lambda a, b: _count_leaks(a, b) > 0, "return an int, not bool"),
        (
            lambda a, b: (
                b["Text"]
                .map(lambda t: " ".join(t.split()).lower())
                .isin(set(a["Text"].map(lambda t: " ".join(t.split()).lower())))
                .sum()
            ),
            "convert with int",
        ),
        (lambda a, b: int(b["Text"].isin(set(a["Text"])).sum()), "normalising"),
        (lambda a, b: len(set(a["Text"].str.lower()) & set(b["Text"].str.lower())), "normalising"),
        (
            lambda a, b: sum(
                any(s.split()[0].lower() in t.lower() for t in a["Text"]) for s in b["Text"]
            ),
            "exact",
        ),
        (lambda a, b: _count_leaks(b, a), "second argument"),
    ],
    ids=["float", "bool", "numpy", "exact-text", "unique", "substring", "swapped"],
)
def test_count_leaks_check_rejects_typical_mistakes(wrong, message: str, capsys) -> None:
    assert not ch04.check_count_leaks(wrong)
    out = capsys.readouterr().out
    assert "Not yet" in out and message in out


# --- chapter 4: pooling -------------------------------------------------------------------------


def _mean_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = torch.arange(hidden.shape[1])[None, :] < lengths[:, None]
    return (hidden * mask[..., None]).sum(1) / lengths[:, None]


def test_mean_pooling_check_accepts_the_solution(capsys) -> None:
    assert ch04.check_mean_pooling(_mean_pool)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda h, n: h.mean(1), "padding positions count"),
        (lambda h, n: h[torch.arange(h.shape[0]), n - 1], "last real token"),
        (lambda h, n: _mean_pool(h, n) * n[:, None], "sum of the real tokens"),
        (lambda h, n: h.mean(2), "shape"),
        (lambda h, n: torch.stack([h[i, 1 : int(k)].mean(0) for i, k in enumerate(n)]), "rows"),
        (lambda h, n: h.mean(1).tolist(), "tensor, not list"),
        (lambda h, n: h[n], "IndexError"),
    ],
    ids=["all-positions", "last-token", "sum", "wrong-axis", "skips-first", "list", "raises"],
)
def test_mean_pooling_check_rejects_typical_mistakes(wrong, message: str, capsys) -> None:
    assert not ch04.check_mean_pooling(wrong)
    out = capsys.readouterr().out
    assert "Not yet" in out and message in out


# --- chapter 5 ----------------------------------------------------------------------------------


def test_expected_lora_count_matches_the_real_lora_model() -> None:
    model = train.prepare_model(GPTClassifier(GPTModel("tiny")), "lora", rank=3, alpha=3)
    head = sum(p.numel() for p in model.gpt.out_head.parameters())
    assert lora.count_parameters(model).trainable - head == ch05.expected_lora_parameters(
        GPT_CONFIGS["tiny"], 3
    )


def test_gpt2_small_rank16_count() -> None:
    assert ch05.expected_lora_parameters(GPT_CONFIGS["gpt2-small"], 16) == 2_654_208


def _freeze_last_block(model) -> None:
    model.requires_grad_(False)
    for module in (model.gpt.trf_blocks[-1], model.gpt.final_norm, model.gpt.out_head):
        module.requires_grad_(True)


def _forgets_norm(model) -> None:
    model.requires_grad_(False)
    for module in (model.gpt.trf_blocks[-1], model.gpt.out_head):
        module.requires_grad_(True)


def _first_block(model) -> None:
    model.requires_grad_(False)
    for module in (model.gpt.trf_blocks[0], model.gpt.final_norm, model.gpt.out_head):
        module.requires_grad_(True)


def test_last_block_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch05.check_last_block(_freeze_last_block)
    assert ch05.check_last_block(lambda m: train.prepare_model(m, "last-block"))
    capsys.readouterr()
    assert not ch05.check_last_block(_forgets_norm)
    assert "gpt.final_norm.weight" in capsys.readouterr().out
    assert not ch05.check_last_block(_first_block)
    out = capsys.readouterr().out
    assert "gpt.trf_blocks.0." in out and "should be frozen" in out
    assert not ch05.check_last_block(lambda m: None)  # everything left trainable
    assert "should be frozen" in capsys.readouterr().out


# --- chapter 6 ----------------------------------------------------------------------------------


def _use_adapter(model, adapter) -> None:
    lora.unmerge_lora(model)
    with torch.no_grad():
        for layer in lora.adapter_layers(model).values():
            layer.lora.B.zero_()
        model.load_state_dict(adapter, strict=False)


def _no_reset(model, adapter) -> None:
    model.load_state_dict(adapter, strict=False)


def _no_unmerge(model, adapter) -> None:
    with torch.no_grad():
        for layer in lora.adapter_layers(model).values():
            layer.lora.B.zero_()
        model.load_state_dict(adapter, strict=False)


def test_use_adapter_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch06.check_use_adapter(_use_adapter)
    capsys.readouterr()
    assert not ch06.check_use_adapter(_no_reset)
    assert "reset every LoRA layer" in capsys.readouterr().out
    assert not ch06.check_use_adapter(_no_unmerge)
    assert "unmerge" in capsys.readouterr().out
    assert not ch06.check_use_adapter(
        lambda model, adapter: model.load_state_dict(adapter)
    )  # strict: raises
    assert "raised RuntimeError" in capsys.readouterr().out


def test_adapter_bytes_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch06.check_adapter_bytes(
        lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    )
    capsys.readouterr()
    assert not ch06.check_adapter_bytes(
        lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    )
    assert "counts every parameter" in capsys.readouterr().out
    assert not ch06.check_adapter_bytes(
        lambda m: sum(4 * p.numel() for p in m.parameters() if p.requires_grad)
    )
    assert "assumes 4 bytes" in capsys.readouterr().out
    assert not ch06.check_adapter_bytes(
        lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    )
    assert "not bytes" in capsys.readouterr().out
