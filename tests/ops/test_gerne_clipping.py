"""max_grad_norm clips the extrapolated gradient with clip_grad_norm_'s semantics, on every
backend: against torch.nn.utils.clip_grad_norm_ applied to g = (1 + beta) g_lb - beta g_b formed
in float64, then torch.optim fed the clipped g (rounded once). In each mode, through the
wrapper, and under a GradScaler (the norm is that of the unscaled g), with ``opt.grad_norm`` the
pre-clip norm, as clip_grad_norm_ returns it."""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import gradients, loss_of, make_batches, make_model

BETA = 1.5
MAX_NORMS = {"clipping": 0.05, "not-clipping": 1e3}  # the first is far below ||g|| here
MODES = ("stash", "lean", "one_backward", "wrapper")
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def clipped_in_float64(model, x_b, x_lb, max_norm):
    """(g clipped by clip_grad_norm_ in float64 and rounded to float32, its pre-clip norm)."""
    holders = []
    for gb, glb in zip(gradients(model, x_b), gradients(model, x_lb)):
        holder = torch.zeros_like(gb, dtype=torch.float64)
        holder.grad = (1 + BETA) * glb.double() - BETA * gb.double()
        holders.append(holder)
    norm = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    return [h.grad.float() for h in holders], float(norm)


def make_opt(mode, model, backend, max_norm, scaler=None):
    if mode == "wrapper":
        return gk.GERNEWrapper(torch.optim.SGD(model.parameters(), **HYPER), beta=BETA,
                               backend=backend, max_grad_norm=max_norm, grad_scaler=scaler)
    return gk.GERNE(model.parameters(), optimizer="sgd", beta=BETA, backend=backend,
                    max_grad_norm=max_norm, grad_scaler=scaler, **HYPER)


def gerne_step(mode, model, opt, x_b, x_lb, scaler=None):
    scale = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)
    opt.zero_grad()
    if mode == "lean":
        opt.backward_biased(scale(loss_of(model, x_b)))
        opt.backward_less_biased(scale(loss_of(model, x_lb)))
    elif mode == "one_backward":
        scale(opt.extrapolated_loss(loss_of(model, x_b), loss_of(model, x_lb))).backward()
    else:
        scale(loss_of(model, x_b)).backward()
        opt.stash_biased()
        scale(loss_of(model, x_lb)).backward()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_norm", MAX_NORMS.values(), ids=MAX_NORMS.keys())
@pytest.mark.parametrize("amp", [False, True], ids=["unscaled", "grad-scaler"])
def test_max_grad_norm_is_clip_grad_norm_of_g(backend, mode, max_norm, amp):
    model, ref = make_model().to(backend.device), make_model().to(backend.device)
    scaler = (torch.amp.GradScaler(backend.device, init_scale=2.0 ** 10, growth_interval=1000)
              if amp else None)
    opt = make_opt(mode, model, backend.name, max_norm, scaler)
    sgd = torch.optim.SGD(ref.parameters(), foreach=False, **HYPER)
    for x_b, x_lb in make_batches(4):
        x_b, x_lb = x_b.to(backend.device), x_lb.to(backend.device)
        clipped, norm = clipped_in_float64(ref, x_b, x_lb, max_norm)
        for p, g in zip(ref.parameters(), clipped):
            p.grad = g
        sgd.step()
        gerne_step(mode, model, opt, x_b, x_lb, scaler)
        assert opt.grad_norm is not None and opt.grad_norm.dtype == torch.float32
        assert float(opt.grad_norm) == pytest.approx(norm, rel=2e-6)
        if max_norm == MAX_NORMS["clipping"]:
            assert norm > 4 * max_norm  # the case clips
    if amp:
        assert scaler.get_scale() == 2.0 ** 10  # no step was skipped
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_norm_is_none_without_max_grad_norm(backend):
    model = make_model().to(backend.device)
    opt = make_opt("stash", model, backend.name, None)
    (x_b, x_lb), = make_batches(1)
    gerne_step("stash", model, opt, x_b.to(backend.device), x_lb.to(backend.device))
    assert opt.grad_norm is None


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_max_grad_norm_must_be_positive(value):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match="max_grad_norm"):
        gk.GERNE(model.parameters(), max_grad_norm=value)
