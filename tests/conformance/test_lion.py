"""GERNE's Lion against Lion's formula in float64 and against timm's Lion.

The formula (Chen et al. 2023), written here independently of the package:

    g <- -g (maximize);   c = beta1 * m + (1 - beta1) * g
    p <- p * (1 - lr * wd) - lr * sign(c)        (sign(0) = 0)
    m <- beta2 * m + (1 - beta2) * g

with g = (1 + beta) g_lb - beta g_b. GERNE(optimizer="lion") in float32 is checked step by step
against the formula applied in float64 to its own parameters and momentum (so that no drift
between the runs can flip a sign), in the stash, memory-lean and one-backward modes; in float64
on the reference backend over a whole run; and over several steps against GERNEWrapper around
``timm.optim.Lion`` (and, at beta = 0, against timm's Lion itself).
"""

import pytest
import torch

import gerne_kernels as gk
from conformance.helpers import gerne_step, plain_steps
from gerne_testing import loss_of, make_batches, make_model

BETA = 0.75
CONFIGS = {
    "default": {},
    "wd": dict(lr=1e-2, weight_decay=0.1),
    "maximize-betas": dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.05, maximize=True),
}
DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)


def lion_formula(p, m, g, lr, betas, weight_decay, maximize):
    """One Lion step in float64 on copies: (p, m) after it."""
    p, m, g = p.double(), m.double(), g.double()
    beta1, beta2 = betas
    if maximize:
        g = -g
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * torch.sign(c)
    return p, beta2 * m + (1 - beta2) * g


def gradients(model, x):
    return torch.autograd.grad(loss_of(model, x), list(model.parameters()))


@pytest.mark.parametrize("mode", ["stash", "lean", "one_backward"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_each_step_is_the_formula(backend, config, mode):
    hyper = dict(DEFAULTS, **CONFIGS[config])
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer="lion", beta=BETA, backend=backend,
                   **CONFIGS[config])
    params = list(model.parameters())
    for x_b, x_lb in make_batches(5):
        g = [(1 + BETA) * lb.double() - BETA * b.double()
             for b, lb in zip(gradients(model, x_b), gradients(model, x_lb))]
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone() if p in opt.state
                   else torch.zeros_like(p)) for p in params]
        gerne_step(opt, mode, lambda: loss_of(model, x_b), lambda: loss_of(model, x_lb))
        for p, (p0, m0), gi in zip(params, before, g):
            p_expected, m_expected = lion_formula(p0, m0, gi, **hyper)
            # A float32 g and m round c; a sign flips only where |c| is within that rounding
            # of 0, which these batches avoid (a flip would move p by 2 lr).
            torch.testing.assert_close(p.detach().double(), p_expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m_expected,
                                       rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float64_run_is_the_formula(config):
    hyper = dict(DEFAULTS, **CONFIGS[config])
    model = make_model(dtype=torch.float64)
    opt = gk.GERNE(model.parameters(), optimizer="lion", beta=BETA, backend="reference",
                   **CONFIGS[config])
    params = [p.detach().clone() for p in model.parameters()]
    moments = [torch.zeros_like(p) for p in params]
    reference = make_model(dtype=torch.float64)
    for x_b, x_lb in make_batches(6):
        x_b, x_lb = x_b.double(), x_lb.double()
        with torch.no_grad():
            for q, p in zip(reference.parameters(), params):
                q.copy_(p)
        g_b, g_lb = gradients(reference, x_b), gradients(reference, x_lb)
        for i, (b, lb) in enumerate(zip(g_b, g_lb)):
            params[i], moments[i] = lion_formula(params[i], moments[i],
                                                 (1 + BETA) * lb - BETA * b, **hyper)
        gerne_step(opt, "stash", lambda: loss_of(model, x_b), lambda: loss_of(model, x_lb))
    for p, expected, m in zip(model.parameters(), params, moments):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("maximize", [False, True])
def test_sign_of_zero_is_zero(backend, maximize):
    """Where g and m are 0, c = 0 and sign(c) = 0: the element does not move (without weight
    decay) or only decays (with it); sign(0) taken as +-1 would move it by lr."""
    used, unused = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    half = torch.nn.Parameter(torch.randn(6))
    p0 = [p.detach().clone() for p in (used, unused, half)]
    opt = gk.GERNE([used, half], optimizer="lion", lr=0.1, beta=BETA, maximize=maximize,
                   backend=backend)
    opt.add_param_group({"params": [unused], "weight_decay": 0.5})

    def loss():
        return (used * used).sum() + (half[:3] * 2).sum() + 0 * unused.sum()
    for _ in range(3):
        gerne_step(opt, "stash", loss, loss)
    assert torch.equal(half.detach()[3:], p0[2][3:])  # gradient 0 there: never moved
    assert not torch.equal(half.detach()[:3], p0[2][:3])
    expected = p0[1].double() * (1 - 0.1 * 0.5) ** 3  # only the decay
    torch.testing.assert_close(unused.detach().double(), expected, rtol=1e-6, atol=1e-7)
    assert not opt.state[half]["exp_avg"][3:].any()


@pytest.fixture
def timm_lion():
    return pytest.importorskip("timm.optim").Lion


def test_defaults_are_timms(timm_lion):
    timm_lion = timm_lion(make_model().parameters())
    opt = gk.GERNE(make_model().parameters(), optimizer="lion")
    for key, value in DEFAULTS.items():
        assert opt.defaults[key] == value == timm_lion.defaults[key], key


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_against_gerne_wrapper_around_timm_lion(backend, config, timm_lion):
    hyper = CONFIGS[config]
    model, ref = make_model(), make_model()
    opt = gk.GERNE(model.parameters(), optimizer="lion", beta=BETA, backend=backend, **hyper)
    wrapped = gk.GERNEWrapper(timm_lion(ref.parameters(), **hyper), beta=BETA,
                              backend=backend)
    for x_b, x_lb in make_batches(8):
        for m, o in ((model, opt), (ref, wrapped)):
            gerne_step(o, "stash", lambda: loss_of(m, x_b), lambda: loss_of(m, x_lb))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], wrapped.base.state[q]["exp_avg"],
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_beta_zero_is_timms_lion(backend, config, timm_lion):
    hyper = CONFIGS[config]
    model, ref = make_model(), make_model()
    opt = gk.GERNE(model.parameters(), optimizer="lion", beta=0.0, backend=backend, **hyper)
    ref_opt = timm_lion(ref.parameters(), **hyper)
    plain_steps([(model, opt), (ref, ref_opt)], [x for x, _ in make_batches(8)], loss_of)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
