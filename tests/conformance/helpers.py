"""Shared pieces of the conformance tests: float32 ulp distances, the four ways to feed a GERNE
step (stash, memory-lean, one-backward, GERNEWrapper) and the independent oracle, torch.optim
fed .grad = (1 + beta) g_lb - beta g_b (formed in float64, rounded once)."""

import torch

import gerne_kernels as gk

TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

# stash: loss_b.backward(); stash_biased(); loss_lb.backward(); lean: backward_biased() and
# backward_less_biased(); one_backward: extrapolated_loss(...).backward(); wrapper: the stash
# mode of GERNEWrapper around the torch.optim optimizer of the same name.
MODES = ("stash", "lean", "one_backward", "wrapper")


def ulp_distance(actual, expected, floor=0.0):
    """|actual - expected| elementwise, in float32 units in the last place of the largest of
    |actual|, |expected| and ``floor`` (a number or a tensor; 0 where both are equal)."""
    a, e = actual.detach().double(), expected.detach().double()
    magnitude = torch.maximum(torch.maximum(a.abs(), e.abs()),
                              torch.as_tensor(floor, dtype=torch.float64)).float()
    spacing = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
    return (a - e).abs() / spacing.double()


def assert_all_ulps(cases, ulps):
    """cases: (what, actual, expected, floor); each pair has one shape and dtype and lies within
    ``ulps`` float32 ulps of values at least ``floor`` in magnitude. One pass over all of
    them; the message names the worst."""
    cases = [(what, torch.as_tensor(a).detach(), torch.as_tensor(e).detach(), floor)
             for what, a, e, floor in cases]
    for what, a, e, _ in cases:
        assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    cases = [c for c in cases if c[1].numel()]
    if not cases:
        return
    distance = ulp_distance(torch.cat([a.reshape(-1) for _, a, _, _ in cases]),
                            torch.cat([e.reshape(-1) for _, _, e, _ in cases]),
                            torch.cat([torch.full((a.numel(),), float(floor), dtype=torch.float64)
                                       for _, a, _, floor in cases]))
    if float(distance.max()) <= ulps:
        return
    worst = max(cases, key=lambda c: float(ulp_distance(c[1], c[2], c[3]).max()))
    what, a, e, floor = worst
    raise AssertionError(
        f"{what}: {float(ulp_distance(a, e, floor).max()):.1f} float32 ulps apart (allowed "
        f"{ulps}); largest absolute difference {float((a.double() - e.double()).abs().max()):.3g}")


def assert_tensors_ulps(actual, expected, ulps, what="parameter", floor=0.0):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    assert_all_ulps([(f"{what} {i}", a, e, floor)
                     for i, (a, e) in enumerate(zip(actual, expected))], ulps)


def assert_states_ulps(gerne_state, torch_state, ulps):
    """Two state_dict()["state"]s: the same parameters, the same keys, each tensor within ulps
    of its largest element (a state element that is a small difference of larger terms, such
    as a momentum whose gradient changed sign, carries the rounding of those terms)."""
    assert gerne_state.keys() == torch_state.keys()
    cases = []
    for index in torch_state:
        assert gerne_state[index].keys() == torch_state[index].keys(), index
        for key, expected in torch_state[index].items():
            expected = torch.as_tensor(expected)
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            cases.append((f"state[{index}][{key!r}]", gerne_state[index][key], expected, scale))
    assert_all_ulps(cases, ulps)


def make_gerne(mode, params, kind, hyper, beta, backend):
    """The optimizer under test: GERNE(optimizer=kind), or GERNEWrapper around torch.optim's."""
    if mode == "wrapper":
        return gk.GERNEWrapper(TORCH_OPTIMIZERS[kind](params, **hyper), beta=beta,
                               backend=backend)
    return gk.GERNE(params, optimizer=kind, beta=beta, backend=backend, **hyper)


def gerne_step(opt, mode, loss_b, loss_lb, on_grads=None, set_to_none=True):
    """One step of ``opt`` in ``mode`` on two loss closures, from zero_grad(set_to_none) on.
    ``on_grads(stage)`` runs where .grad holds a finished gradient: "b" (stash modes, before
    stash_biased()) and "lb" (before step(); the stash is pending then)."""
    opt.zero_grad(set_to_none=set_to_none)
    if mode in ("stash", "wrapper"):
        loss_b().backward()
        if on_grads is not None:
            on_grads("b")
        opt.stash_biased()
        loss_lb().backward()
    elif mode == "lean":
        opt.backward_biased(loss_b())
        opt.backward_less_biased(loss_lb())
    elif mode == "one_backward":
        opt.extrapolated_loss(loss_b(), loss_lb()).backward()
    else:
        raise ValueError(mode)
    if on_grads is not None:
        on_grads("lb")
    opt.step()


def plain_steps(runs, inputs, loss):
    """torch.optim's plain loop (GERNE's at beta = 0) for each (model, optimizer) of runs:
    zero_grad(); loss(model, x).backward(); step() for each x of inputs."""
    for x in inputs:
        for model, opt in runs:
            opt.zero_grad()
            loss(model, x).backward()
            opt.step()


def extrapolated(g_b, g_lb, beta, dtype):
    """(1 + beta) g_lb - beta g_b in float64, rounded once to dtype (None: zeros)."""
    like = g_lb if g_lb is not None else g_b
    g_b = torch.zeros_like(like) if g_b is None else g_b
    g_lb = torch.zeros_like(like) if g_lb is None else g_lb
    return ((1 + beta) * g_lb.double() - beta * g_b.double()).to(dtype)


def oracle_step(params, ref_opt, loss_b, loss_lb, beta):
    """The independent oracle: torch.optim stepped on (1 + beta) g_lb - beta g_b, the two
    gradients taken with torch.autograd.grad (the forwards run in the order GERNE's do)."""
    params = list(params)
    g_b = torch.autograd.grad(loss_b(), params, allow_unused=True)
    g_lb = torch.autograd.grad(loss_lb(), params, allow_unused=True)
    for p, gb, glb in zip(params, g_b, g_lb):
        p.grad = None if gb is None and glb is None else extrapolated(gb, glb, beta, p.dtype)
    ref_opt.step()
    ref_opt.zero_grad()


def state_of(opt, p):
    """The optimizer state of p (the base's, for a wrapper)."""
    return (opt.base if isinstance(opt, gk.GERNEWrapper) else opt).state[p]
