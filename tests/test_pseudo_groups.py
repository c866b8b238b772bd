"""Pseudo-attributes (Algorithm 2) and the biased model's training with CBA checkpointing."""
import numpy as np
import pytest
import torch

from gerne_kernels.metrics import class_balanced_accuracy
from gerne_kernels.pseudo_groups import model_scores, pseudo_attributes, train_biased_model


def oracle(probs, labels, t):
    """float64 numpy: per class, the floor(t n) lowest own-class probabilities get 1."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    out = np.zeros(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        conf = probs[idx, k]
        n = int(np.floor(t * len(idx)))
        out[idx[np.argsort(conf, kind="stable")[:n]]] = 1
    return out


def test_hand_example_with_probabilities():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7],
                          [0.95, 0.05], [0.55, 0.45], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1, 0, 0, 1])
    # class 0: own-class confidences 0.9, 0.6, 0.95, 0.55 -> floor(0.5*4) = 2 lowest: idx 5, 2
    # class 1: 0.8, 0.7, 0.9 -> floor(0.5*3) = 1 lowest: idx 3
    out = pseudo_attributes(probs, labels, 0.5)
    assert out.tolist() == [0, 0, 1, 1, 0, 1, 0]
    assert out.dtype == torch.long
    # t = 0.3: floor(1.2) = 1 in class 0 (idx 5), floor(0.9) = 0 in class 1
    assert pseudo_attributes(probs, labels, 0.3).tolist() == [0, 0, 0, 0, 0, 1, 0]


def test_logits_and_probabilities_agree_with_oracle():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(300, 4)) * 3)
    labels = torch.tensor(rng.integers(0, 4, 300))
    probs = torch.softmax(logits, dim=1)
    expected = oracle(probs.numpy(), labels.numpy(), 0.2)
    for scores, kind in ((logits, "auto"), (logits, "logits"), (probs, "auto"), (probs, "probs")):
        assert pseudo_attributes(scores, labels, 0.2, scores_are=kind).numpy().tolist() == \
            expected.tolist()
    counts = np.bincount(labels.numpy(), minlength=4)
    got = pseudo_attributes(logits, labels, 0.2)
    assert [int(got[labels == k].sum()) for k in range(4)] == [int(0.2 * n) for n in counts]


def test_logits_in_unit_interval_are_not_mistaken_for_probabilities():
    # rows in [0, 1] that do not sum to 1 are logits: softmax changes the ranking here
    logits = torch.tensor([[0.5, 0.0, 0.0], [0.6, 0.9, 0.0], [0.9, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    # softmax own-class confidences 0.45, 0.34, 0.55: row 1 is the least confident;
    # read as probabilities, row 0 (0.5) would be
    assert pseudo_attributes(logits, labels, 0.34).tolist() == [0, 1, 0]
    assert pseudo_attributes(logits, labels, 0.34, scores_are="probs").tolist() == [1, 0, 0]


def test_saturated_softmax_still_ranked():
    # softmax of both rows is 1.0 in float32; log-softmax separates them
    logits = torch.tensor([[200.0, 0.0], [120.0, 0.0], [150.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert pseudo_attributes(logits, labels, 0.4).tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("t", [0, -0.1, 0.51, 1.0, "0.2"])
def test_rejects_bad_t(t):
    with pytest.raises(ValueError, match="t must be"):
        pseudo_attributes(torch.zeros(2, 2), torch.tensor([0, 1]), t)


def test_rejects_bad_scores():
    with pytest.raises(ValueError, match="rows"):
        pseudo_attributes(torch.zeros(3, 2), torch.tensor([0, 1]), 0.5)
    with pytest.raises(ValueError, match="columns"):
        pseudo_attributes(torch.zeros(2, 2), torch.tensor([0, 2]), 0.5)
    with pytest.raises(ValueError, match="inf or NaN"):
        pseudo_attributes(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), 0.5)
    with pytest.raises(ValueError, match="scores_are"):
        pseudo_attributes(torch.zeros(2, 2), torch.tensor([0, 1]), 0.5, scores_are="x")
    with pytest.raises(ValueError, match="outside"):
        pseudo_attributes(torch.tensor([[2.0, -1.0]]), torch.tensor([0]), 0.5, scores_are="probs")


def _toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.8 * torch.randn(n, 3, generator=g)
    return x, y


def test_biased_model_keeps_best_cba_checkpoint(monkeypatch):
    made = {}
    real_sgd = torch.optim.SGD

    class SpySGD(real_sgd):
        def __init__(self, params, **kw):
            made.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    train, val = _toy(600, 0), _toy(300, 1)
    torch.manual_seed(0)
    result = train_biased_model(lambda: torch.nn.Linear(3, 3), train, val, lr=0.5,
                                weight_decay=1e-3, steps=60, batch_size=8, eval_every=7,
                                generator=torch.Generator().manual_seed(0))
    # a tenth of the base lr, twice the base weight decay
    assert made["lr"] == pytest.approx(0.05) and made["weight_decay"] == pytest.approx(2e-3)
    steps = [s for s, _ in result.history]
    assert steps == [7, 14, 21, 28, 35, 42, 49, 56, 60]
    best = max(cba for _, cba in result.history)
    assert result.best_cba == best
    assert result.best_step == next(s for s, cba in result.history if cba == best)
    # the returned model holds the best checkpoint, not the last weights
    cba_now = class_balanced_accuracy(model_scores(result.model, val[0]), val[1])
    assert cba_now == pytest.approx(best)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, result.state_dict[k])
    assert best > 0.6  # the toy problem is learnable


def test_biased_model_input_errors():
    x, y = _toy(30, 0)
    with pytest.raises(TypeError, match="tuple"):
        train_biased_model(torch.nn.Linear(3, 3), x, (x, y), lr=0.1, weight_decay=0.0, steps=1,
                           batch_size=2)
    with pytest.raises(ValueError, match="steps"):
        train_biased_model(torch.nn.Linear(3, 3), (x, y), (x, y), lr=0.1, weight_decay=0.0,
                           steps=0, batch_size=2)
