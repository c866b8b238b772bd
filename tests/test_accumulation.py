"""Gradient accumulation in the stash mode: N micro-batch pairs, then one step, equal the step on
the full batches. Interleaved pairs (biased, less-biased, biased, ...: HF's and Lightning's
order) accumulate the biased backwards into the stash with accumulate_biased(); one batch after
the other works with stash_biased() between them. The oracle is GERNE's own full-batch step,
itself held against torch.optim in tests/conformance."""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import assert_params_close, loss_of, make_batches, make_model, stash_step

PAIRS = 3
OPTIMIZERS = {
    "sgd": lambda ps, backend: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9, beta=1.5,
                                        backend=backend),
    "adamw": lambda ps, backend: gk.GERNE(ps, optimizer="adamw", lr=1e-2, beta=1.5,
                                          backend=backend),
    "wrapper": lambda ps, backend: gk.GERNEWrapper(torch.optim.AdamW(ps, lr=1e-2), beta=1.5,
                                                   backend=backend),
}


def interleaved_step(model, opt, x_b, x_lb):
    opt.zero_grad()
    for mb_b, mb_lb in zip(x_b.chunk(PAIRS), x_lb.chunk(PAIRS)):
        with opt.accumulate_biased():
            (loss_of(model, mb_b) / PAIRS).backward()
        (loss_of(model, mb_lb) / PAIRS).backward()
    opt.step()


def one_batch_after_the_other_step(model, opt, x_b, x_lb):
    opt.zero_grad()
    for mb_b in x_b.chunk(PAIRS):
        (loss_of(model, mb_b) / PAIRS).backward()
    opt.stash_biased()
    for mb_lb in x_lb.chunk(PAIRS):
        (loss_of(model, mb_lb) / PAIRS).backward()
    opt.step()


ACCUMULATIONS = {"interleaved": interleaved_step,
                 "one-batch-after-the-other": one_batch_after_the_other_step}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("accumulation", sorted(ACCUMULATIONS))
def test_micro_batch_pairs_equal_the_full_batch_step(backend, name, accumulation):
    whole, split = make_model(), make_model()
    opt_whole = OPTIMIZERS[name](whole.parameters(), backend)
    opt_split = OPTIMIZERS[name](split.parameters(), backend)
    for x_b, x_lb in make_batches(4, size=12):
        stash_step(whole, opt_whole, x_b, x_lb)
        ACCUMULATIONS[accumulation](split, opt_split, x_b, x_lb)
        assert not opt_split.has_stash()
    assert_params_close(split, whole)
    # the batches differ (else the test could not tell g_b from g_lb): beta matters
    other = make_model()
    opt_other = OPTIMIZERS[name](other.parameters(), backend)
    for group in opt_other.param_groups:
        group["beta"] = 0.0
    for x_b, x_lb in make_batches(4, size=12):
        stash_step(other, opt_other, x_b, x_lb)
    assert not torch.allclose(other[0].weight, whole[0].weight, rtol=1e-3, atol=1e-4)


def test_interleaving_without_accumulate_biased_is_refused(backend):
    """The next biased backward would add into .grad holding g_lb: a second stash_biased()
    before step() raises instead of mixing them."""
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), backend)
    (x_b, x_lb), = make_batches(1, size=12)
    loss_of(model, x_b).backward()
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    loss_of(model, x_b).backward()
    with pytest.raises(RuntimeError, match="stash_biased\\(\\) was called twice"):
        opt.stash_biased()


def test_accumulate_biased_keeps_the_less_biased_gradient_apart(backend):
    """Inside the context .grad is the stash; outside it the less-biased gradient, unchanged."""
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), backend)
    (x_b, x_lb), = make_batches(1, size=12)
    loss_of(model, x_lb).backward()
    g_lb = [p.grad.clone() for p in model.parameters()]
    with opt.accumulate_biased():
        loss_of(model, x_b).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g_lb))
    assert opt.has_stash()
    model.zero_grad()
    loss_of(model, x_b).backward()
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["grad_b"], p.grad)
