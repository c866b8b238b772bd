"""track_statistics=True: ||g_b||, ||g_lb||, ||g|| and cos(g_b, g_lb) of each step against a
float64 computation from separately computed gradients."""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import gradients, loss_of, make_batches, make_model, stash_step

BETAS = (0.5, 3.0)  # one per param group: ||g|| sums groups extrapolated differently


def grouped(model):
    return [{"params": model[0].parameters(), "beta": BETAS[0]},
            {"params": model[2].parameters(), "beta": BETAS[1]}]


def expected_statistics(model, x_b, x_lb):
    g_b = [g.double().flatten() for g in gradients(model, x_b)]
    g_lb = [g.double().flatten() for g in gradients(model, x_lb)]
    betas = [BETAS[0]] * 2 + [BETAS[1]] * 2  # per parameter, in model order
    g = torch.cat([(1 + beta) * lb - beta * b for beta, b, lb in zip(betas, g_b, g_lb)])
    g_b, g_lb = torch.cat(g_b), torch.cat(g_lb)
    return {"norm_b": g_b.norm(), "norm_lb": g_lb.norm(), "norm": g.norm(),
            "cos": torch.dot(g_b, g_lb) / (g_b.norm() * g_lb.norm())}


def make_opt(kind, model, backend, **kwargs):
    if kind == "gerne":
        return gk.GERNE(grouped(model), optimizer="sgd", lr=0.1, momentum=0.9, backend=backend,
                        track_statistics=True, **kwargs)
    return gk.GERNEWrapper(torch.optim.Adam(grouped(model), lr=1e-2), backend=backend,
                           track_statistics=True, **kwargs)


def assert_statistics(stats, expected, rtol=1e-5):
    for name, value in expected.items():
        got = getattr(stats, name)
        assert got.dim() == 0 and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), value, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("kind", ["gerne", "wrapper"])
def test_statistics_of_each_step(backend, kind):
    model = make_model()
    opt = make_opt(kind, model, backend)
    for x_b, x_lb in make_batches(3):
        expected = expected_statistics(model, x_b, x_lb)
        stash_step(model, opt, x_b, x_lb)
        assert_statistics(opt.statistics, expected)


@pytest.mark.parametrize("kind", ["gerne", "wrapper"])
@pytest.mark.parametrize("unscale", [False, True])
def test_statistics_are_of_the_unscaled_gradients(kind, unscale):
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = make_opt(kind, model, "auto", grad_scaler=scaler)
    (x_b, x_lb), = make_batches(1)
    expected = expected_statistics(model, x_b, x_lb)
    opt.zero_grad()
    scaler.scale(loss_of(model, x_b)).backward()
    opt.stash_biased()
    scaler.scale(loss_of(model, x_lb)).backward()
    if unscale:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert_statistics(opt.statistics, expected)


def test_reduced_precision_parameters_accumulate_in_float32(backend):
    model = make_model(dtype=torch.bfloat16)
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0, backend=backend,
                   track_statistics=True)
    (x_b, x_lb), = make_batches(1)
    x_b, x_lb = x_b.bfloat16(), x_lb.bfloat16()
    g_b = torch.cat([g.double().flatten() for g in gradients(model, x_b)])
    g_lb = torch.cat([g.double().flatten() for g in gradients(model, x_lb)])
    stash_step(model, opt, x_b, x_lb)
    assert_statistics(opt.statistics, {"norm_b": g_b.norm(), "norm_lb": g_lb.norm(),
                                       "norm": (2 * g_lb - g_b).norm(),
                                       "cos": torch.dot(g_b, g_lb) / g_b.norm() / g_lb.norm()})


def test_off_by_default_and_skipped_steps_show_nonfinite():
    model = make_model()
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0)
    (x_b, x_lb), = make_batches(1)
    stash_step(model, opt, x_b, x_lb)
    assert opt.statistics is None
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0, track_statistics=True,
                   skip_nonfinite=True)
    opt.zero_grad()
    loss_of(model, x_b).backward()
    model[0].bias.grad[0] = float("inf")
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    opt.step()
    assert opt.skipped_steps == 1
    stats = opt.statistics.as_floats()
    assert stats["norm_b"] == float("inf") and stats["norm_lb"] < float("inf")
