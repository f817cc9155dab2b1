"""The judges of chapters 1-6 and 8 decide on a probe's data alone: the data of a right answer
pass, and the same data with NaN, a float or int subclass, or a wrong type in one place never do.
Also ``Check.on_value`` (the form of checks that take a prediction) and ``type_name``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_exercises_ch01_03 import _merge_to_linear, _rank_r_approx
from test_exercises_ch04_06 import (
    _accuracy,
    _count_leaks,
    _dedupe,
    _freeze_last_block,
    _mean_pool,
    _save,
    _targets,
    _train_step,
    _use_adapter,
)
from test_exercises_ch08 import delta_solution, first_step, layout_solution
from test_exercises_new import EmbeddingWithLoRA, subspace_similarity

from lora_tutorial.exercises import ch01, ch02, ch03, ch04, ch05, ch06, ch08
from lora_tutorial.exercises._feedback import BadData, Check, Other, decode, encode, type_name


class MyFloat(float):
    pass


class MyInt(int):
    pass


class MyTensor(torch.Tensor):
    pass


class MyStr(str):
    pass


NAN = float("nan")

RIGHT: dict[str, tuple[Check, Any]] = {
    "rank_r_approx": (ch01.check_rank_r_approx, _rank_r_approx),
    "subspace_similarity": (ch01.check_subspace_similarity, subspace_similarity),
    "break_even_rank": (ch01.check_break_even_rank, lambda m, n: (m * n - 1) // (m + n)),
    "trainable_prediction": (ch02.check_trainable_prediction, 18_562),
    "sgd_state_prediction": (ch02.check_sgd_state_prediction, 324_656),
    "activation_growth": (ch02.check_activation_growth, 2.0),
    "merge_to_linear": (ch03.check_merge_to_linear, _merge_to_linear),
    "rslora_alpha": (ch03.check_rslora_alpha, lambda a, r: a / r**0.5),
    "embedding_lora": (ch03.check_embedding_lora, EmbeddingWithLoRA),
    "dedupe": (ch04.check_dedupe, _dedupe),
    "count_leaks": (ch04.check_count_leaks, _count_leaks),
    "mean_pooling": (ch04.check_mean_pooling, _mean_pool),
    "accuracy": (ch05.check_accuracy, _accuracy),
    "train_step": (ch05.check_train_step, _train_step),
    "last_block": (ch05.check_last_block, _freeze_last_block),
    "use_adapter": (ch06.check_use_adapter, _use_adapter),
    "save_lora": (ch06.check_save_lora, _save),
    "adapter_targets": (ch06.check_adapter_targets, _targets),
    "adapter_layout": (ch08.check_adapter_layout, layout_solution),
    "multi_adapter_delta": (ch08.check_multi_adapter_delta, delta_solution),
    "first_step_drop": (ch08.check_first_step_drop, first_step),
}


@functools.cache
def _right_data(name: str) -> str:
    check, answer = RIGHT[name]
    return encode(check.probe(answer))


def _passes(check: Check, data: Any) -> bool:
    try:
        problems, _ = check.verdict(encode(data))
    except BadData:  # what the grader reports as broken, never as a pass
        return False
    return not problems


def _replaced(data: Any, path: tuple, change: Callable[[Any], Any]) -> Any:
    """``data`` with the value at ``path`` (indices and keys) replaced by ``change(value)``."""
    if not path:
        return change(data)
    key, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, key: _replaced(data[key], rest, change)}
    items = list(data)
    items[key] = _replaced(items[key], rest, change)
    return tuple(items) if isinstance(data, tuple) else items


def _nan_like(value: torch.Tensor) -> torch.Tensor:
    return torch.full_like(value, NAN)


def _subclassed(value: torch.Tensor) -> torch.Tensor:
    return value.as_subclass(MyTensor)


_W_QUERY = "gpt.trf_blocks.0.att.W_query"
_A_0 = "gpt.trf_blocks.0.att.W_query.lora.A"
_FF_1 = "trf_blocks.1.ff.layers.0"

HOSTILE: list[tuple[str, tuple, Callable[[Any], Any]]] = [
    ("rank_r_approx", (0, 0), _nan_like),
    ("rank_r_approx", (1, 0), _subclassed),
    ("rank_r_approx", (2, 0), lambda v: v.tolist()),
    ("subspace_similarity", (0, 0), lambda v: NAN),
    ("subspace_similarity", (0, 0), MyFloat),
    ("subspace_similarity", (0, 0), lambda v: 1),  # the right value as an int
    ("subspace_similarity", (0, 0), lambda v: True),
    ("break_even_rank", (2, 0), lambda v: True),  # 4 x 3: the right answer is 1
    ("break_even_rank", (2, 0), MyInt),
    ("break_even_rank", (2, 0), float),
    ("trainable_prediction", (), MyInt),
    ("trainable_prediction", (), float),
    ("trainable_prediction", (), lambda v: NAN),
    ("sgd_state_prediction", (), MyInt),
    ("sgd_state_prediction", (), MyFloat),
    ("sgd_state_prediction", (), lambda v: NAN),
    ("sgd_state_prediction", (), str),
    ("activation_growth", (), lambda v: NAN),
    ("activation_growth", (), MyFloat),
    ("activation_growth", (), torch.tensor),
    ("merge_to_linear", (0, "weight"), _nan_like),
    ("merge_to_linear", (1, "weight"), _subclassed),
    ("merge_to_linear", (0, "in"), MyInt),
    ("merge_to_linear", (0, "in"), float),
    ("merge_to_linear", (0, "plain"), lambda v: 1),
    ("merge_to_linear", (0, "bias"), lambda v: "bias"),
    ("merge_to_linear", (0, "after", "lora.B"), _nan_like),
    ("rslora_alpha", (0, 0), lambda v: NAN),
    ("rslora_alpha", (0, 0), MyFloat),
    ("rslora_alpha", (0, 0), str),
    ("embedding_lora", ("scaling",), MyFloat),
    ("embedding_lora", ("scaling",), int),
    ("embedding_lora", ("scaling",), lambda v: NAN),
    ("embedding_lora", ("random", 0), _nan_like),
    ("embedding_lora", ("A",), _subclassed),
    ("embedding_lora", ("A_trains",), lambda v: 1),
    ("dedupe", ("result", 0), lambda v: v["Text"]),  # a Series
    ("dedupe", ("result", 0), lambda v: v.assign(Text=[MyStr(t) for t in v["Text"]])),
    ("dedupe", ("result", 0), lambda v: v.assign(Text=NAN)),
    ("dedupe", ("result", 0), lambda v: v.set_axis([float(i) for i in v.index])),
    ("dedupe", ("after",), lambda v: v.assign(Label=NAN)),
    ("dedupe", ("whole", 0), MyInt),
    ("dedupe", ("whole", 0), float),
    ("dedupe", ("whole", 0), lambda v: NAN),
    ("dedupe", ("whole", 0), str),
    ("count_leaks", ("result", 0), MyInt),
    ("count_leaks", ("result", 0), float),
    ("count_leaks", ("result", 0), lambda v: True),
    ("count_leaks", ("result", 0), lambda v: NAN),
    ("count_leaks", ("result", 0), torch.tensor),
    ("count_leaks", ("type",), lambda v: "int64"),  # a NumPy integer, converted by encode
    ("mean_pooling", (0,), _nan_like),
    ("mean_pooling", (0,), _subclassed),
    ("mean_pooling", (0,), lambda v: v.tolist()),
    ("mean_pooling", (0,), lambda v: v.bool()),
    ("mean_pooling", (0,), lambda v: v[None]),
    ("accuracy", (0, 0), MyFloat),
    ("accuracy", (0, 0), lambda v: NAN),
    ("accuracy", (0, 0), lambda v: torch.tensor(v)),
    ("train_step", (0, "loss", 0), MyFloat),
    ("train_step", (1, "loss", 0), lambda v: NAN),
    ("train_step", (2, "params", 0), _nan_like),
    ("train_step", (2, "params"), lambda v: v[1:]),
    ("last_block", (0,), lambda v: [*v, 1]),
    ("last_block", (0,), set),
    ("use_adapter", (0, 0), _nan_like),
    ("use_adapter", (1, 0), _subclassed),
    ("use_adapter", (1, 0), lambda v: v.tolist()),
    ("save_lora", ("metadata", "rank"), lambda v: 2),
    ("save_lora", ("metadata", "alpha"), lambda v: "nan"),
    ("save_lora", ("tensors", _A_0), _nan_like),
    ("save_lora", ("tensors", _A_0), _subclassed),
    ("save_lora", ("names",), lambda v: [*v, 1]),
    ("adapter_targets", (0, 0, _W_QUERY), MyInt),
    ("adapter_targets", (0, 0, _W_QUERY), float),
    ("adapter_targets", (1, 0), lambda v: dict.fromkeys(v, NAN)),
    ("adapter_targets", (1, 0), lambda v: dict.fromkeys(v, True)),
    ("adapter_layout", (0, _FF_1), MyInt),
    ("adapter_layout", (0, _FF_1), float),
    ("adapter_layout", (0, _FF_1), lambda v: NAN),
    ("adapter_layout", (0, _FF_1), lambda v: True),
    ("adapter_layout", (0, _FF_1), torch.tensor),
    ("adapter_layout", (0,), lambda v: list(v.items())),
    ("adapter_layout", (0,), lambda v: dict(enumerate(v.values()))),  # keys not strings
    ("multi_adapter_delta", (0,), _nan_like),
    ("multi_adapter_delta", (0,), _subclassed),
    ("multi_adapter_delta", (0,), lambda v: v.tolist()),
    ("multi_adapter_delta", (0,), lambda v: v.double()[:, 0]),
    ("multi_adapter_delta", (0,), lambda v: v > 0),
    ("first_step_drop", (0, 0), MyFloat),
    ("first_step_drop", (1, 0), lambda v: NAN),
    ("first_step_drop", (2, 0), lambda v: True),
    ("first_step_drop", (3, 0), torch.tensor),
    ("first_step_drop", (4, 0), str),
    ("first_step_drop", (5, 0), lambda v: float("inf")),
    ("first_step_drop", (5, 0), lambda v: 10**400),  # no float holds it
    ("first_step_drop", (0,), lambda v: (v[0], 1)),  # an error that is not a string
    ("first_step_drop", (), lambda v: v[:-1]),
]


@pytest.mark.parametrize("name", list(RIGHT))
def test_the_judge_passes_a_right_answers_data(name: str) -> None:
    check, _ = RIGHT[name]
    problems, success = check.verdict(_right_data(name))
    assert not problems and success


@pytest.mark.parametrize(
    ("name", "path", "change"), HOSTILE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(HOSTILE)]
)
def test_the_judge_alone_rejects_hostile_data(
    name: str, path: tuple, change: Callable[[Any], Any]
) -> None:
    check, _ = RIGHT[name]
    assert not _passes(check, _replaced(decode(_right_data(name)), path, change))


def test_a_check_of_a_value_probes_the_value_itself(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []

    def judge(data: Any) -> tuple[list[str], str]:
        seen.append(data)
        return ([] if type(data) is int and data == 3 else ["not 3"]), "three"

    check = Check.on_value(judge)
    assert check.probe(3) == 3 and check(3)
    assert not check(MyInt(3)) and not check(True) and not check(3.0)
    assert [type_name(v) for v in seen] == ["int", "MyInt", "bool", "float"]
    assert isinstance(seen[1], Other) and "Not yet:" in capsys.readouterr().out
    assert type_name(torch.zeros(1)) == "Tensor"
