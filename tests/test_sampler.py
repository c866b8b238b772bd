"""TwoBatchSampler: class balance, Eq. 4 proportions (statistically), errors, DataLoader recipe."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gerne_kernels.sampler import (ClassBalancedSampler, TwoBatchSampler, group_counts,
                                   lb_group_probabilities)

# Two classes, three attribute values, very unequal groups; class 1 misses nothing.
COUNTS = np.array([[50, 7, 3],
                   [2, 11, 40]])


def dataset_from_counts(counts, seed=0):
    y, a = [], []
    for k in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            y += [k] * int(counts[k, j])
            a += [j] * int(counts[k, j])
    perm = np.random.default_rng(seed).permutation(len(y))
    return torch.tensor(y)[perm], torch.tensor(a)[perm]


def oracle_p_lb(counts, c):
    """Eq. 4 in float64 numpy, written independently of the package: per class y the
    share c is spread over the A_y groups that have samples, empty groups get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros_like(counts)
    for k, row in enumerate(counts):
        present = row > 0
        out[k, present] = (1 - c) * row[present] / row.sum() + c / present.sum()
    return out


def assert_binomial(observed, n, p, sigmas=5.0):
    """Every observed count is within `sigmas` binomial standard deviations of n * p."""
    observed, p = np.asarray(observed, dtype=np.float64), np.asarray(p, dtype=np.float64)
    sd = np.sqrt(n * p * (1 - p))
    dev = np.abs(observed - n * p)
    assert np.all(dev <= sigmas * sd + 1e-9), (observed, n * p, sd)


def assert_drawn_like(table, draws_per_class, p):
    """Each class's row of drawn group counts is binomial around draws_per_class * p[row]."""
    for k in range(table.shape[0]):
        assert_binomial(table[k], draws_per_class, p[k])


def tally(sampler, steps, which):
    y, a = sampler.labels.numpy(), sampler.attributes.numpy()
    k, n_a = sampler.counts.shape
    table = np.zeros((k, n_a))
    for _ in range(steps):
        idx = (sampler.sample_b() if which == "b" else sampler.sample_lb()).numpy()
        np.add.at(table, (y[idx], a[idx]), 1)
    return table


def test_group_counts_matches_numpy():
    rng = np.random.default_rng(1)
    y, a = rng.integers(0, 4, 500), rng.integers(0, 3, 500)
    expected = np.zeros((4, 3), dtype=np.int64)
    np.add.at(expected, (y, a), 1)
    assert np.array_equal(group_counts(torch.tensor(y), torch.tensor(a)).numpy(), expected)
    assert group_counts(y, a, num_classes=5, num_attributes=4).shape == (5, 4)


def test_lb_probabilities_match_eq4():
    for c in (0.1, 0.5, 1.0):
        p = lb_group_probabilities(torch.tensor(COUNTS), c).numpy()
        np.testing.assert_allclose(p, oracle_p_lb(COUNTS, c), rtol=0, atol=1e-15)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-15)


@pytest.mark.parametrize("c", [0.5, 1.0])
def test_both_batches_exactly_class_balanced(c):
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=9, c=c, generator=torch.Generator().manual_seed(0))
    for idx_b, idx_lb in s:
        for idx in (idx_b, idx_lb):
            assert idx.dtype == torch.long and idx.shape == (18,)
            assert torch.bincount(y[idx], minlength=2).tolist() == [9, 9]


def test_biased_batch_follows_alpha():
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=20, c=0.5, generator=torch.Generator().manual_seed(1))
    steps = 400
    assert_drawn_like(tally(s, steps, "b"), 20 * steps, COUNTS / COUNTS.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("c", [0.3, 0.5, 1.0])
def test_less_biased_batch_follows_eq4(c):
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=20, c=c, generator=torch.Generator().manual_seed(2))
    steps = 400
    table = tally(s, steps, "lb")
    assert_drawn_like(table, 20 * steps, oracle_p_lb(COUNTS, c))
    if c == 1.0:  # group-balanced in expectation: every group 1/A of its class
        assert_binomial(table[0], 20 * steps, np.full(3, 1 / 3))


def test_less_biased_batch_is_far_from_alpha_when_c_is_one():
    """A check that could fail: with c = 1 the rare group (y=0, a=2, alpha = 0.05) is drawn
    about a third of the time, not 5 %."""
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=50, c=1.0, generator=torch.Generator().manual_seed(3))
    table = tally(s, 40, "lb")
    share = table[0, 2] / table[0].sum()
    assert 0.28 < share < 0.39


def test_uniform_inside_group():
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=30, c=1.0, generator=torch.Generator().manual_seed(4))
    hits = np.zeros(len(y))
    steps = 300
    for _ in range(steps):
        np.add.at(hits, s.sample_lb().numpy(), 1)
    members = torch.nonzero((y == 1) & (a == 1)).view(-1).numpy()  # 11 samples
    draws = steps * 30 / 3  # expected draws of the group (c = 1, A = 3)
    assert_binomial(hits[members], draws, np.full(len(members), 1 / len(members)))
    assert hits[members].sum() > 0


def test_len_is_one_epoch():
    y, a = dataset_from_counts(COUNTS)  # N = 113, K = 2
    s = TwoBatchSampler(y, a, batch_size=10, c=0.5)
    assert len(s) == math.ceil(113 / 20) == len(list(s))
    assert len(TwoBatchSampler(y, a, 10, 0.5, steps_per_epoch=3)) == 3


def test_reproducible_with_generator():
    y, a = dataset_from_counts(COUNTS)
    run = [[t.tolist() for pair in TwoBatchSampler(y, a, 5, 0.5, torch.Generator().manual_seed(7))
            for t in pair] for _ in range(2)]
    assert run[0] == run[1]


def test_dataloader_recipe_concatenates_b_then_lb():
    y, a = dataset_from_counts(COUNTS)
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1)
    direct = list(TwoBatchSampler(y, a, 4, 0.5, torch.Generator().manual_seed(9)))
    s = TwoBatchSampler(y, a, 4, 0.5, torch.Generator().manual_seed(9))
    loader = DataLoader(TensorDataset(x, y, a), batch_sampler=s.batch_sampler())
    assert len(loader) == len(direct)
    for (xb, yb, _), (idx_b, idx_lb) in zip(loader, direct):
        x_b, x_lb = xb.chunk(2)
        assert x_b.view(-1).long().tolist() == idx_b.tolist()
        assert x_lb.view(-1).long().tolist() == idx_lb.tolist()
        assert torch.equal(yb.chunk(2)[1], y[idx_lb])


def test_class_balanced_sampler_alone():
    y, _ = dataset_from_counts(COUNTS)
    s = ClassBalancedSampler(y, 6, torch.Generator().manual_seed(0))
    for idx in s:
        assert torch.bincount(y[idx], minlength=2).tolist() == [6, 6]


@pytest.mark.parametrize("c", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_rejects_bad_c(c):
    y, a = dataset_from_counts(COUNTS)
    with pytest.raises(ValueError, match="c must be"):
        TwoBatchSampler(y, a, 4, c)


@pytest.mark.parametrize("bs", [0, -3, 2.5])
def test_rejects_bad_batch_size(bs):
    y, a = dataset_from_counts(COUNTS)
    with pytest.raises(ValueError, match="batch_size"):
        TwoBatchSampler(y, a, bs, 0.5)


def test_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        TwoBatchSampler(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 2, 0.5)


def test_rejects_class_without_samples():
    y, a = torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        TwoBatchSampler(y, a, 2, 0.5)


# Class 0 lacks a=1, class 2 lacks a=0 and a=3: A_0 = 3, A_1 = 4, A_2 = 2.
SPARSE = np.array([[60, 0, 4, 1],
                   [30, 5, 5, 2],
                   [0, 9, 41, 0]])


def test_empty_groups_get_zero_and_present_ones_share_c():
    for c in (0.25, 0.5, 1.0):
        p = lb_group_probabilities(torch.tensor(SPARSE), c).numpy()
        np.testing.assert_allclose(p, oracle_p_lb(SPARSE, c), rtol=0, atol=1e-15)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-15)
        assert np.all(p[SPARSE == 0] == 0)
    # by hand, class 2 with c = 1: group-balanced over its two present groups
    np.testing.assert_allclose(lb_group_probabilities(torch.tensor(SPARSE), 1.0)[2].numpy(),
                               [0, 0.5, 0.5, 0], atol=1e-15)


@pytest.mark.parametrize("c", [0.5, 1.0])
def test_sparse_groups_drawn_with_the_generalized_eq4(c):
    y, a = dataset_from_counts(SPARSE)
    with pytest.warns(UserWarning, match="3 group"):
        s = TwoBatchSampler(y, a, batch_size=25, c=c, generator=torch.Generator().manual_seed(5))
    steps = 400
    table = tally(s, steps, "lb")
    assert_drawn_like(table, 25 * steps, oracle_p_lb(SPARSE, c))
    assert np.all(table[SPARSE == 0] == 0)
    assert_drawn_like(tally(s, steps, "b"), 25 * steps, SPARSE / SPARSE.sum(axis=1, keepdims=True))


def test_sampler_lists_empty_groups_and_warns_once():
    y, a = dataset_from_counts(SPARSE)
    with pytest.warns(UserWarning) as record:
        s = TwoBatchSampler(y, a, 4, 0.5)
        for _ in s:
            pass
    assert len(record) == 1
    message = str(record[0].message)
    assert "(y=0, a=1)" in message and "(y=2, a=0)" in message and "(y=2, a=3)" in message
    assert s.empty_groups == [(0, 1), (2, 0), (2, 3)]
    assert s.attributes_per_class.tolist() == [3, 4, 2]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete groups: no warning
        assert TwoBatchSampler(*dataset_from_counts(COUNTS), 4, 0.5).empty_groups == []


def test_sampler_bounds_use_the_same_a_y():
    """At beta_max the expected group weight (1 + beta) p_lb - beta p_b of the batches the
    sampler draws touches 0 or 1, and stays in [0, 1] just below it."""
    y, a = dataset_from_counts(SPARSE)
    with pytest.warns(UserWarning):
        s = TwoBatchSampler(y, a, 4, 0.5)
    lo, hi = s.beta_bounds()
    alpha = SPARSE / SPARSE.sum(axis=1, keepdims=True)
    p = oracle_p_lb(SPARSE, 0.5)
    for beta, edge in ((hi, True), (0.999 * hi, False), (lo, True)):
        w = ((1 + beta) * p - beta * alpha)[SPARSE > 0]  # empty groups: 0 whatever beta
        assert w.min() >= -1e-12 and w.max() <= 1 + 1e-12
        assert (min(abs(w.min()), abs(1 - w.max())) < 1e-9) == edge
    assert s.beta_bounds(simplified=True).high == pytest.approx(hi)


def test_real_sparse_colored_mnist_is_accepted():
    """The offline digits at 2 % minority with randomly drawn conflicting colors, one image
    per sample (350 per class): many (digit, color) groups are empty by chance."""
    from gerne_kernels.datasets import colored_mnist

    d = colored_mnist("train", 0.02, size=7, assignment="random", n_per_class=350)
    empty = int((group_counts(d.y, d.a) == 0).sum())
    assert empty > 20
    with pytest.warns(UserWarning, match=f"{empty} group"):
        s = TwoBatchSampler(d.y, d.a, 8, 1.0, torch.Generator().manual_seed(0))
    assert len(s.empty_groups) == empty
    idx = torch.cat([s.sample_lb() for _ in range(50)])
    drawn = set(zip(d.y[idx].tolist(), d.a[idx].tolist()))
    assert drawn.isdisjoint(s.empty_groups)


def test_rejects_negative_or_fractional_labels():
    with pytest.raises(ValueError, match="labels"):
        TwoBatchSampler(torch.tensor([0, -1]), torch.tensor([0, 0]), 1, 1.0)
    with pytest.raises(ValueError, match="attributes"):
        TwoBatchSampler(torch.tensor([0, 1]), torch.tensor([0.5, 0.0]), 1, 1.0)
