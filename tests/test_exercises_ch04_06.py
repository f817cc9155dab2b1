"""The exercise checks of chapters 4-6 accept the solutions and reject the typical mistakes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lora_tutorial import lora, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises import ch04, ch05, ch06
from lora_tutorial.gpt import GPT_CONFIGS, GPTModel

# --- chapter 4: pooling -------------------------------------------------------------------------


def test_pooling_check_accepts_last_real_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch04.check_pooling(lambda h, n: h[torch.arange(h.shape[0]), n - 1])
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda h, n: h[:, -1], "position -1"),
        (lambda h, n: h[torch.arange(h.shape[0]), n], "raised IndexError"),
        (lambda h, n: h[:, n - 1], "shape"),
        (lambda h, n: h[torch.arange(h.shape[0]), n.clamp(max=h.shape[1] - 1)], "off by one"),
        (lambda h, n: h[:, 0], "rows"),
    ],
    ids=["last-position", "index-length", "broadcast", "off-by-one-clamped", "first-token"],
)
def test_pooling_check_rejects_typical_mistakes(
    wrong, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not ch04.check_pooling(wrong)
    assert message in capsys.readouterr().out


# --- chapter 4: balancing -----------------------------------------------------------------------


def _balance(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    spam = df[df["Label"] == 1]
    return pd.concat([df[df["Label"] == 0].sample(len(spam), random_state=seed), spam])


def _mutating(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    df["order"] = (
        df.sample(frac=1, random_state=seed).groupby("Label").cumcount()
    )  # writes into the caller's frame
    return df[df["order"] < (df["Label"] == 1).sum()]


@pytest.mark.parametrize(
    "fn", [_balance, lambda df, seed: ch04_package_balance(df, seed)], ids=["solution", "package"]
)
def test_balance_check_accepts_right_answers(fn, capsys: pytest.CaptureFixture[str]) -> None:
    assert ch04.check_balance(fn)
    assert "Correct" in capsys.readouterr().out


def ch04_package_balance(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    from lora_tutorial.data import balance_classes

    return balance_classes(df, seed=seed)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda df, seed: df.copy(), "draw as many ham"),
        (lambda df, seed: df.groupby("Label").sample(4, random_state=seed), "keep all 8 spam"),
        (
            lambda df, seed: pd.concat(
                [
                    df[df["Label"] == 0].sample(8, replace=True, random_state=seed),
                    df[df["Label"] == 1],
                ]
            ),
            "appear twice",
        ),
        (
            lambda df, seed: pd.concat([df[df["Label"] == 0].sample(8), df[df["Label"] == 1]]),
            "same seed",
        ),
        (_mutating, "changed the DataFrame"),
    ],
    ids=["no-balancing", "drops-spam", "with-replacement", "unseeded", "mutates-input"],
)
def test_balance_check_rejects_typical_mistakes(
    wrong, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not ch04.check_balance(wrong)
    assert message in capsys.readouterr().out


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


def test_balance_check_reports_a_non_frame_from_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = []

    def frame_once(df: pd.DataFrame, seed: int):
        calls.append(seed)
        return _balance(df, seed) if len(calls) == 1 else None

    assert not ch04.check_balance(frame_once)
    assert "return a pandas DataFrame, not NoneType" in capsys.readouterr().out
