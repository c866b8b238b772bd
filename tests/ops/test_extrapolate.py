"""extrapolate_ on every backend against the oracle (harness.run_against_oracle: the reference,
or for the reference backend the reference in float64): out = scale_lb * g_lb + scale_b * g_b,
into a separate list (starting as NaN: written, never read) or over grads_lb itself."""

import torch

import harness

OP = "extrapolate_"
CASES = harness.grid(harness.VARIANTS[OP], quick=(0, 1), labels=["out", "out_is_grads_lb"])


@harness.over_cases(CASES)
def test_extrapolate_matches_the_oracle(backend, case):
    """Every dtype x beta, into a separate out and over grads_lb."""
    harness.check_op(backend, OP, case.dtype, beta=case.beta, steps=1, **case.options)


class TestLayouts(harness.LayoutChecks):
    OP = OP
    OPTIONS = dict(steps=1)
    BLOCKS_DTYPE = torch.float16


def test_the_largest_finite_gradients_cancel(backend):
    """g_b = max, g_lb = -max (float32's largest finite value) with scale_b = scale_lb = 1:
    out = 0 exactly, no overflow in forming g."""
    big = torch.finfo(torch.float32).max
    device = backend.device
    g_b = [torch.full((33,), big, device=device), torch.full((5,), -0.0, device=device)]
    g_lb = [torch.full((33,), -big, device=device), torch.zeros(5, device=device)]
    out = [torch.full_like(g, float("nan")) for g in g_lb]
    found_inf = torch.zeros((), device=device)
    backend.op(OP)(out, g_b, g_lb, found_inf, scale_b=1.0, scale_lb=1.0)
    assert float(found_inf) == 0.0
    assert torch.equal(out[0].cpu(), torch.zeros(33)) and torch.equal(out[1].cpu(), torch.zeros(5))
