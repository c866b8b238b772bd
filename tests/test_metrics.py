"""Group metrics against hand-computed examples and a float64 numpy oracle."""
import math

import numpy as np
import pytest
import torch

from gerne_kernels.metrics import accuracy, class_balanced_accuracy, group_metrics

# 2 classes x 2 attributes. Groups and their hits:
#   (0,0): 4 samples, 4 right -> 1.0     (0,1): 2 samples, 1 right -> 0.5
#   (1,0): 1 sample, 0 right -> 0.0      (1,1): 3 samples, 3 right -> 1.0
Y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
A = [0, 0, 0, 0, 1, 1, 0, 1, 1, 1]
P = [0, 0, 0, 0, 0, 1, 0, 1, 1, 1]


def test_hand_example():
    m = group_metrics(P, Y, A)
    assert m.per_group == {(0, 0): (1.0, 4), (0, 1): (0.5, 2), (1, 0): (0.0, 1), (1, 1): (1.0, 3)}
    assert m.gba == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m.wga == 0.0 and m.worst_group == (1, 0)
    assert m.cba == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert m.accuracy == pytest.approx(8 / 10)
    assert m.empty_groups == []


def test_torch_numpy_and_scores_agree():
    scores = torch.nn.functional.one_hot(torch.tensor(P), 2).float() * 3 - 1
    a = group_metrics(torch.tensor(P), torch.tensor(Y), torch.tensor(A))
    b = group_metrics(np.array(P), np.array(Y), np.array(A))
    c = group_metrics(scores, Y, A)  # (N x K) scores: argmax
    assert a == b == c


def test_empty_group_reported_not_averaged():
    y, a = [0, 0, 1, 1], [0, 1, 0, 0]  # (1, 1) has no sample
    m = group_metrics([0, 1, 1, 0], y, a)
    assert m.empty_groups == [(1, 1)]
    acc, n = m.per_group[(1, 1)]
    assert math.isnan(acc) and n == 0
    assert m.gba == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert m.wga == 0.0
    d = m.as_dict()
    assert d["per_group"]["1,1"] == {"accuracy": None, "count": 0}
    assert d["empty_groups"] == [[1, 1]]


def test_num_attributes_declares_missing_values_as_empty():
    m = group_metrics([0, 1], [0, 1], [0, 0], num_attributes=3)
    assert sorted(m.empty_groups) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert m.gba == 1.0


def test_random_against_numpy_oracle():
    rng = np.random.default_rng(0)
    y, a, p = rng.integers(0, 4, 3000), rng.integers(0, 3, 3000), rng.integers(0, 4, 3000)
    m = group_metrics(p, y, a)
    accs = [np.mean(p[(y == k) & (a == j)] == k) for k in range(4) for j in range(3)]
    assert m.gba == pytest.approx(np.mean(accs), abs=1e-12)
    assert m.wga == pytest.approx(np.min(accs), abs=1e-12)
    assert m.cba == pytest.approx(np.mean([np.mean(p[y == k] == k) for k in range(4)]), abs=1e-12)
    assert class_balanced_accuracy(p, y) == m.cba
    assert accuracy(p, y) == pytest.approx(np.mean(p == y))


def test_errors():
    with pytest.raises(ValueError, match="differ in length"):
        group_metrics([0, 1], [0, 1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="empty"):
        group_metrics([], [], [])
    with pytest.raises(ValueError, match="integer"):
        group_metrics([0, 1], [0.5, 1], [0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        group_metrics([0, 1], [0, 1], [0, -1])
