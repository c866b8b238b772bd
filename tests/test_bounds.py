"""beta_bounds (Eq. 9): the paper's example, a brute-force oracle on p_ext, edge cases."""
import math
import pickle

import numpy as np
import pytest
import torch

from gerne_kernels.bounds import BetaBounds, beta_bounds


def cmnist_counts(minority, per_class=10_000, k=10):
    """alpha_yy = 1 - minority, the rest spread evenly over the other k - 1 colors."""
    t = np.full((k, k), minority * per_class / (k - 1))
    np.fill_diagonal(t, (1 - minority) * per_class)
    return t


def p_ext(counts, c, beta):
    """Eq. 8 in float64 numpy: alpha + c (beta + 1) (1/A - alpha)."""
    counts = np.asarray(counts, dtype=np.float64)
    alpha = counts / counts.sum(axis=1, keepdims=True)
    return alpha + c * (beta + 1) * (1 / counts.shape[1] - alpha)


def admissible(counts, c, beta, tol=1e-12):
    p = p_ext(counts, c, beta)
    return bool(np.all(p >= -tol) and np.all(p <= 1 + tol))


def test_paper_example_colored_mnist_half_percent():
    b = beta_bounds(counts=cmnist_counts(0.005), c=0.5)
    assert round(b.high, 2) == 1.22
    # hand computation: 0.995 / (0.5 * (0.995 - 0.1)) - 1
    assert b.high == pytest.approx(0.995 / (0.5 * 0.895) - 1, rel=1e-12)
    s = beta_bounds(counts=cmnist_counts(0.005), c=0.5, simplified=True)
    assert s.low == -1.0 and round(s.high, 2) == 1.22


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [0.25, 0.5, 1.0])
def test_bounds_are_where_p_ext_leaves_unit_interval(seed, c):
    """Oracle: inside the bounds every p_ext is in [0, 1], just outside some is not."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, size=(rng.integers(2, 5), rng.integers(2, 5)))
    lo, hi = beta_bounds(counts=counts, c=c)
    assert lo < hi
    for beta in np.linspace(lo, hi, 7):
        assert admissible(counts, c, beta)
    eps = 1e-6 * max(1.0, abs(hi), abs(lo))
    assert not admissible(counts, c, hi + eps)
    assert not admissible(counts, c, lo - eps)
    # on the bound some group's weight is exactly 0 or 1
    for edge in (lo, hi):
        p = p_ext(counts, c, edge)
        assert min(abs(p.min()), abs(1 - p.max())) < 1e-9


def test_labels_attributes_equal_counts_table():
    rng = np.random.default_rng(3)
    y, a = rng.integers(0, 3, 400), rng.integers(0, 4, 400)
    counts = np.zeros((3, 4))
    np.add.at(counts, (y, a), 1)
    from_labels = beta_bounds(torch.tensor(y), torch.tensor(a), 0.5)
    from_counts = beta_bounds(counts=counts, c=0.5)
    assert tuple(from_labels) == pytest.approx(tuple(from_counts), rel=1e-12)
    assert "labels and attributes" in from_labels.source
    assert "group counts" in from_counts.source


def test_balanced_groups_are_skipped():
    unbalanced = np.array([[90, 10]])
    both = np.array([[90, 10], [50, 50]])  # class 1 has alpha = 1/A everywhere
    assert tuple(beta_bounds(counts=both, c=0.5)) == tuple(beta_bounds(counts=unbalanced, c=0.5))


def test_all_balanced_is_unbounded():
    b = beta_bounds(counts=np.full((3, 4), 7), c=0.5)
    assert b.low == -math.inf and b.high == math.inf
    assert "unbounded" in b.source
    s = beta_bounds(counts=np.full((3, 4), 7), c=0.5, simplified=True)
    assert tuple(s) == (-1.0, math.inf)


def test_simplified_uses_largest_alpha():
    counts = np.array([[70, 30], [5, 95]])  # alpha_max = 0.95 at (y=1, a=1)
    s = beta_bounds(counts=counts, c=0.5, simplified=True)
    assert s.high == pytest.approx(0.95 / (0.5 * (0.95 - 0.5)) - 1, rel=1e-12)
    assert "(y=1, a=1)" in s.source


def p_ext_present(counts, c, beta):
    """Eq. 8 with A_y = number of non-empty groups of class y, float64 numpy; empty groups
    are drawn by neither batch and get weight 0 whatever beta."""
    counts = np.asarray(counts, dtype=np.float64)
    alpha = counts / counts.sum(axis=1, keepdims=True)
    a_y = (counts > 0).sum(axis=1, keepdims=True)
    return np.where(counts > 0, alpha + c * (beta + 1) * (1 / a_y - alpha), 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_empty_groups_are_skipped_with_a_y(seed):
    rng = np.random.default_rng(10 + seed)
    counts = rng.integers(1, 60, size=(4, 5))
    counts[rng.random(counts.shape) < 0.3] = 0
    counts[:, 0] = np.maximum(counts[:, 0], 1)  # no class empty
    lo, hi = beta_bounds(counts=counts, c=0.5)
    for beta in np.linspace(lo, hi, 7):
        p = p_ext_present(counts, 0.5, beta)
        assert p.min() >= -1e-12 and p.max() <= 1 + 1e-12
    for edge, outside in ((hi, hi + 1e-6 * abs(hi)), (lo, lo - 1e-6 * abs(lo))):
        p = p_ext_present(counts, 0.5, edge)
        assert min(abs(p.min()), abs(1 - p.max())) < 1e-9
        p = p_ext_present(counts, 0.5, outside)
        assert p.min() < 0 or p.max() > 1


def test_empty_group_by_hand():
    # class 0 has one group present: A_0 = 1, alpha = 1 = 1/A_0, no constraint; class 1
    # (alpha 0.9 / 0.1, A = 2): beta_max = 0.9 / (0.5 * 0.4) - 1 = 3.5
    b = beta_bounds(counts=np.array([[10, 0], [9, 1]]), c=0.5)
    assert b.high == pytest.approx(3.5, rel=1e-12)
    assert "A_y=1..2" in b.source
    s = beta_bounds(counts=np.array([[10, 0], [9, 1]]), c=0.5, simplified=True)
    assert s.high == pytest.approx(3.5, rel=1e-12) and "(y=1, a=0)" in s.source
    assert tuple(beta_bounds(counts=np.array([[10, 0], [5, 5]]), c=0.5)) == (-math.inf, math.inf)


def test_simplified_takes_the_smallest_class_bound_when_a_y_differs():
    # class 0: A_0 = 3, alpha_max 0.8 -> 0.8 / (0.5 (0.8 - 1/3)) - 1 = 2.4286
    # class 1: A_1 = 2, alpha_max 0.9 -> 0.9 / (0.5 * 0.4) - 1 = 3.5 (larger alpha, looser)
    counts = np.array([[80, 10, 10], [90, 10, 0]])
    s = beta_bounds(counts=counts, c=0.5, simplified=True)
    assert s.high == pytest.approx(0.8 / (0.5 * (0.8 - 1 / 3)) - 1, rel=1e-12)
    assert "(y=0, a=0)" in s.source
    assert s.high >= beta_bounds(counts=counts, c=0.5).high - 1e-12


def test_betabounds_is_a_pair_with_source():
    b = beta_bounds(counts=cmnist_counts(0.01), c=0.5)
    lo, hi = b
    assert isinstance(b, tuple) and len(b) == 2
    assert (lo, hi) == (b.low, b.high) == (b[0], b[1])
    assert "c=0.5" in b.source and "A=10" in b.source and "binding group" in b.source
    again = pickle.loads(pickle.dumps(b))
    assert tuple(again) == tuple(b) and again.source == b.source
    assert "source=" in repr(b)
    assert BetaBounds(-1, 2, "x").source == "x"


@pytest.mark.parametrize("c", [0, 1.5, -1, None, True])
def test_rejects_bad_c(c):
    with pytest.raises(ValueError, match="c"):
        beta_bounds(counts=np.ones((2, 2)), c=c)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="either"):
        beta_bounds(torch.tensor([0]), torch.tensor([0]), 0.5, counts=np.ones((1, 1)))
    with pytest.raises(ValueError, match="labels and attributes"):
        beta_bounds(c=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        beta_bounds(counts=np.array([[1, -1]]), c=0.5)
    with pytest.raises(ValueError, match="no samples"):
        beta_bounds(counts=np.array([[1, 1], [0, 0]]), c=0.5)
    with pytest.raises(ValueError, match=r"\(K x A\)"):
        beta_bounds(counts=np.ones(3), c=0.5)


def test_gerne_refuses_beta_outside_and_names_the_source():
    import gerne_kernels as gk

    bounds = gk.beta_bounds(counts=cmnist_counts(0.005), c=0.5)
    params = torch.nn.Linear(2, 2).parameters()
    gk.GERNE(params, optimizer="sgd", lr=0.1, beta=1.2, beta_bounds=bounds)
    with pytest.raises(ValueError) as info:
        gk.GERNE(torch.nn.Linear(2, 2).parameters(), optimizer="sgd", lr=0.1, beta=1.25,
                 beta_bounds=bounds)
    assert "1.223" in str(info.value) and bounds.source in str(info.value)
