"""split_two_batch cuts collated B_b || B_lb batches as the sampler builds them;
two_batch_optimizer finds GERNE behind wrappers, and says what it found when it is not there."""

import collections

import pytest
import torch

import integration_task as task_
from gerne_kernels.integrations import split_two_batch, two_batch_optimizer
from integration_task import OPTIMIZERS

Pair = collections.namedtuple("Pair", "x y")


def test_halves_are_the_samplers_two_batches():
    task = task_.tiny_task()
    indices_b, indices_lb = next(iter(task.sampler()))
    batch = {"x": task.x[torch.cat([indices_b, indices_lb])], "tag": "kept",
             "nested": [task.y[torch.cat([indices_b, indices_lb])]]}
    biased, less_biased = split_two_batch(batch)
    assert torch.equal(biased["x"], task.x[indices_b])
    assert torch.equal(less_biased["x"], task.x[indices_lb])
    assert torch.equal(less_biased["nested"][0], task.y[indices_lb])
    assert biased["tag"] == less_biased["tag"] == "kept"


def test_namedtuples_stay_namedtuples():
    biased, less_biased = split_two_batch(Pair(torch.arange(4), torch.arange(4, 8)))
    assert isinstance(biased, Pair) and isinstance(less_biased, Pair)
    assert torch.equal(biased.y, torch.tensor([4, 5]))
    assert torch.equal(less_biased.x, torch.tensor([2, 3]))


def test_an_odd_batch_is_no_pair():
    with pytest.raises(ValueError, match="batch_sampler"):
        split_two_batch(torch.zeros(5, 2))


class Wrapper:
    """A framework's wrapper: keeps the optimizer as .optimizer (accelerate) or ._optimizer
    (Lightning)."""

    def __init__(self, inner, attribute):
        setattr(self, attribute, inner)


def test_found_behind_nested_wrappers():
    opt = OPTIMIZERS[1].gerne(task_.tiny_net().parameters())
    wrapped = Wrapper(Wrapper(opt, "_optimizer"), "optimizer")
    assert two_batch_optimizer(wrapped) is opt
    assert two_batch_optimizer(opt) is opt


def test_a_plain_optimizer_is_named():
    base = torch.optim.AdamW(task_.tiny_net().parameters())
    with pytest.raises(TypeError, match="innermost: AdamW"):
        two_batch_optimizer(Wrapper(base, "optimizer"))
