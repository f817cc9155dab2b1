"""The exercise checks of chapters 4-6 accept the solutions and reject the typical mistakes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _helpers import ROOT
from safetensors import safe_open
from safetensors.torch import save_file

from lora_tutorial import data, lora, train
from lora_tutorial.classroom import notebooks
from lora_tutorial.exercises import ch04, ch05, ch06

CHAPTERS_5_6 = [
    ROOT / "chapters" / "05_finetune_gpt2.ipynb",
    ROOT / "chapters" / "06_adapters.ipynb",
]

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
