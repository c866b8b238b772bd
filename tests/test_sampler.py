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
    """Eq. 4 in float64 numpy, written independently of the package."""
    counts = np.asarray(counts, dtype=np.float64)
    alpha = counts / counts.sum(axis=1, keepdims=True)
    return (1 - c) * alpha + c / counts.shape[1]


def assert_binomial(observed, n, p, sigmas=5.0):
    """Every observed count is within `sigmas` binomial standard deviations of n * p."""
    observed, p = np.asarray(observed, dtype=np.float64), np.asarray(p, dtype=np.float64)
    sd = np.sqrt(n * p * (1 - p))
    dev = np.abs(observed - n * p)
    assert np.all(dev <= sigmas * sd + 1e-9), (observed, n * p, sd)


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
    table = tally(s, steps, "b")
    alpha = COUNTS / COUNTS.sum(axis=1, keepdims=True)
    for k in range(2):
        assert_binomial(table[k], 20 * steps, alpha[k])


@pytest.mark.parametrize("c", [0.3, 0.5, 1.0])
def test_less_biased_batch_follows_eq4(c):
    y, a = dataset_from_counts(COUNTS)
    s = TwoBatchSampler(y, a, batch_size=20, c=c, generator=torch.Generator().manual_seed(2))
    steps = 400
    table = tally(s, steps, "lb")
    p = oracle_p_lb(COUNTS, c)
    for k in range(2):
        assert_binomial(table[k], 20 * steps, p[k])
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


def test_rejects_empty_group_that_lb_would_draw():
    y, a = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 0, 0])  # (y=1, a=1) empty
    with pytest.raises(ValueError, match=r"\(y=1, a=1\)"):
        TwoBatchSampler(y, a, 2, 0.5)


def test_rejects_negative_or_fractional_labels():
    with pytest.raises(ValueError, match="labels"):
        TwoBatchSampler(torch.tensor([0, -1]), torch.tensor([0, 0]), 1, 1.0)
    with pytest.raises(ValueError, match="attributes"):
        TwoBatchSampler(torch.tensor([0, 1]), torch.tensor([0.5, 0.0]), 1, 1.0)
