"""The exercise checks of chapters 4-6 accept the solutions and reject the typical mistakes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _helpers import ROOT
from safetensors import safe_open
from safetensors.torch import save_file

from lora_tutorial import lora, train
from lora_tutorial.classroom import notebooks
from lora_tutorial.exercises import ch04, ch05, ch06

CHAPTERS_5_6 = [
    ROOT / "chapters" / "05_finetune_gpt2.ipynb",
    ROOT / "chapters" / "06_adapters.ipynb",
]

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


def _accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for input_ids, labels, lengths in loader:
            correct += (model(input_ids, lengths).argmax(-1) == labels).sum().item()
            total += len(labels)
    return correct / total


def _accuracy_without_lengths(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        right = [(model(i).argmax(-1) == y).float() for i, y, _ in loader]
    return torch.cat(right).mean().item()


def _accuracy_batch_mean(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        right = [(model(i, n).argmax(-1) == y).float().mean().item() for i, y, n in loader]
    return sum(right) / len(right)


def _accuracy_in_train_mode(model, loader) -> float:
    model.train()
    with torch.no_grad():
        right = [(model(i, n).argmax(-1) == y).float() for i, y, n in loader]
    return torch.cat(right).mean().item()


def test_accuracy_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch05.check_accuracy(_accuracy)
    assert ch05.check_accuracy(lambda m, loader: train.evaluate(m, loader).accuracy)
    capsys.readouterr()
    for wrong, message in [
        (_accuracy_without_lengths, "without lengths"),
        (_accuracy_batch_mean, "mean of the batches"),
        (_accuracy_in_train_mode, "model.eval()"),
        (lambda m, loader: torch.tensor(_accuracy(m, loader)), "Python float"),
        (lambda m, loader: float("nan"), "the classifier gets"),
        (lambda m, loader: 1 / 0, "raised ZeroDivisionError"),
    ]:
        assert not ch05.check_accuracy(wrong)
        assert message in capsys.readouterr().out


def _train_step(model, optimizer, batch) -> float:
    input_ids, labels, lengths = batch
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(input_ids, lengths), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_without_zero_grad(model, optimizer, batch) -> float:
    input_ids, labels, lengths = batch
    loss = torch.nn.functional.cross_entropy(model(input_ids, lengths), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_without_lengths(model, optimizer, batch) -> float:
    input_ids, labels, _ = batch
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(input_ids), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_without_update(model, optimizer, batch) -> float:
    input_ids, labels, lengths = batch
    return torch.nn.functional.cross_entropy(model(input_ids, lengths), labels).item()


def test_train_step_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch05.check_train_step(_train_step)
    capsys.readouterr()
    for wrong, message in [
        (_step_without_zero_grad, "zero_grad"),
        (_step_without_lengths, "with the lengths"),
        (_step_without_update, "did not change"),
        (lambda m, o, b: torch.tensor(_train_step(m, o, b)), "loss.item()"),
        (lambda m, o, b: _train_step(m, o, b) * float("nan"), "expected"),
    ]:
        assert not ch05.check_train_step(wrong)
        assert message in capsys.readouterr().out


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


def _save(model, path, keep=lambda name, p: p.requires_grad, metadata=None) -> None:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if keep(n, p)}
    save_file(tensors, path, metadata={"rank": "2", "alpha": "4"} if metadata is None else metadata)


def test_save_lora_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch06.check_save_lora(_save)
    capsys.readouterr()
    for wrong, message in [
        (lambda m, path: _save(m, path, keep=lambda n, p: True), "frozen tensors"),
        (lambda m, path: _save(m, path, keep=lambda n, p: ".lora." in n), "lacks trained"),
        (lambda m, path: _save(m, path, metadata={}), "metadata should say rank"),
        (lambda m, path: _save(m, path, metadata={"rank": "2", "alpha": "x"}), "say alpha"),
        (lambda m, path: torch.save(m.state_dict(), path), "as safetensors"),
        (lambda m, path: None, "could not read"),
    ]:
        assert not ch06.check_save_lora(wrong)
        assert message in capsys.readouterr().out


def _targets(path, dim=1, suffix=".lora.A") -> dict[str, int]:
    found = {}
    with safe_open(path, "pt") as f:
        names = f.keys()  # a safetensors file is not iterable itself
        for key in names:
            if key.endswith(suffix):
                found[key.removesuffix(suffix)] = f.get_slice(key).get_shape()[dim]
    return found


def test_adapter_targets_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert ch06.check_adapter_targets(_targets)
    capsys.readouterr()
    for wrong, message in [
        (lambda path: _targets(path, dim=0), "input size"),
        (lambda path: _targets(path, suffix=".weight"), "the head"),
        (lambda path: _targets(path, suffix="A"), "expected"),
        (lambda path: sorted(_targets(path)), "return a dict"),
    ]:
        assert not ch06.check_adapter_targets(wrong)
        assert message in capsys.readouterr().out


# --- chapters 5 and 6: the stubs fail, the solutions pass ---------------------------------------


@pytest.mark.parametrize(
    "exercise",
    [ex for path in CHAPTERS_5_6 for ex in notebooks.exercises(path) if ex.check],
    ids=lambda ex: ex.label,
)
def test_stub_fails_and_solution_passes(exercise, capsys: pytest.CaptureFixture[str]) -> None:
    assert exercise.solution_code, f"{exercise.label} has a check but no solution code"
    exec(notebooks.answer_cell_source(exercise), {})  # the stub raises NotImplementedError
    assert "Not yet:" in capsys.readouterr().out
    exec(notebooks.answer_cell_source(exercise, exercise.solution_code), {})  # self-contained
    assert "Correct!" in capsys.readouterr().out


def test_chapters_5_and_6_have_three_checked_exercises_each() -> None:
    for path in CHAPTERS_5_6:
        checked = [ex for ex in notebooks.exercises(path) if ex.check]
        assert len(checked) >= 3, path.name


def test_balance_check_reports_a_non_frame_from_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = []

    def frame_once(df: pd.DataFrame, seed: int):
        calls.append(seed)
        return _balance(df, seed) if len(calls) == 1 else None

    assert not ch04.check_balance(frame_once)
    assert "return a pandas DataFrame, not NoneType" in capsys.readouterr().out
