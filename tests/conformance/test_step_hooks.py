"""torch.optim's step() protocol on GERNE and GERNEWrapper, held against torch.optim.SGD itself:
the step pre- and post-hooks (per optimizer and global) run in torch's order with torch's
arguments, a pre-hook may replace the arguments, hooks run once also for a subclass that
overrides step(), the profiler sees the step's label, and an LR scheduler sees the step."""

import warnings

import pytest
import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import gerne_kernels as gk


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]


def feed(opt, ps):
    """Gradients for one step of opt (a stash first for the two-batch optimizers)."""
    for p in ps:
        p.grad = torch.ones_like(p)
    if isinstance(opt, (gk.GERNE, gk.GERNEWrapper)):
        opt.stash_biased()
        for p in ps:
            p.grad = torch.full_like(p, 0.5)


MAKERS = {
    "torch.optim.SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "GERNE": lambda ps: gk.GERNE(ps, lr=0.1, backend="reference"),
    "GERNEWrapper": lambda ps: gk.GERNEWrapper(torch.optim.SGD(ps, lr=0.1),
                                               backend="reference"),
}


def hook_calls(make):
    """What the four kinds of hooks see over two steps (the second with a closure)."""
    ps = params()
    opt = make(ps)
    calls = []

    def recorder(name):
        def hook(optimizer, args, kwargs):
            calls.append((name, optimizer is opt, len(args), args[0] is opt,
                          sorted(kwargs)))
        return hook

    handles = [register_optimizer_step_pre_hook(recorder("global_pre")),
               opt.register_step_pre_hook(recorder("pre")),
               opt.register_step_post_hook(recorder("post")),
               register_optimizer_step_post_hook(recorder("global_post"))]
    try:
        feed(opt, ps)
        opt.step()
        feed(opt, ps)
        loss = opt.step(closure=lambda: torch.tensor(3.0))
    finally:
        for handle in handles:
            handle.remove()
    return calls, loss


@pytest.mark.parametrize("name", ["GERNE", "GERNEWrapper"])
def test_hooks_see_what_torch_optims_hooks_see(name):
    expected, expected_loss = hook_calls(MAKERS["torch.optim.SGD"])
    calls, loss = hook_calls(MAKERS[name])
    assert [c[0] for c in expected] == ["global_pre", "pre", "post", "global_post"] * 2
    # the wrapper's base is a torch optimizer too: its own step calls the global hooks
    assert [c for c in calls if c[1]] == expected
    assert [c[0] for c in calls if not c[1]] == (["global_pre", "global_post"] * 2
                                                 if name == "GERNEWrapper" else [])
    assert float(loss) == float(expected_loss) == 3.0


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_pre_hook_may_replace_the_arguments(name):
    ps = params()
    opt = MAKERS[name](ps)
    opt.register_step_pre_hook(
        lambda optimizer, args, kwargs: (args, dict(closure=lambda: torch.tensor(7.0))))
    feed(opt, ps)
    assert float(opt.step()) == 7.0


def test_a_pre_hook_returning_something_else_is_an_error():
    ps = params()
    opt = MAKERS["GERNE"](ps)
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: "nonsense")
    feed(opt, ps)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()


class CountingGERNE(gk.GERNE):
    """A subclass that overrides step(): torch wraps it, as any optimizer class's step."""

    def step(self, closure=None):
        self.overridden_calls = getattr(self, "overridden_calls", 0) + 1
        return super().step(closure)


def test_hooks_run_once_for_a_subclass_that_overrides_step():
    ps = params()
    opt = CountingGERNE(ps, lr=0.1, backend="reference")
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    feed(opt, ps)
    opt.step()
    assert calls == ["pre", "post"] and opt.overridden_calls == 1


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_profiler_sees_the_step_label(name):
    ps = params()
    opt = MAKERS[name](ps)
    feed(opt, ps)
    opt.step()  # a step outside the profiler: no label recorded anywhere
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            feed(opt, ps)
            opt.step()
    label = f"Optimizer.step#{type(opt).__name__}.step"
    assert sum(event.name == label for event in prof.events()) == 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_an_lr_scheduler_sees_the_step(name):
    ps = params()
    opt = MAKERS[name](ps)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            feed(opt, ps)
            opt.step()
            scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
