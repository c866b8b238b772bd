"""torch.amp.GradScaler with GERNE and GERNEWrapper under CPU autocast (bfloat16, float16).

The oracle computes each batch's gradient of S * loss under the same autocast, divides by S in
float32 and feeds (1 + beta) g_lb - beta g_b to torch.optim.SGD: GERNE must unscale both
gradients (the stash with the scale it was taken under), also after an explicit
scaler.unscale_(opt), and an inf/NaN in either batch must skip the step and make the scaler
back off.
"""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import assert_same, loss_of, make_batches, make_model, snapshot

BETA = 1.5
MAX_NORM = 0.05
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_opt(kind, model, backend, scaler):
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    if kind == "gerne":
        return gk.GERNE(model.parameters(), optimizer="sgd", beta=BETA, backend=backend,
                        grad_scaler=scaler, **hyper)
    return gk.GERNEWrapper(torch.optim.SGD(model.parameters(), **hyper), beta=BETA,
                           backend=backend, grad_scaler=scaler)


def optimizer_state(opt):
    sd = opt.state_dict()
    return sd["base"]["state"] if "base" in sd else sd["state"]


def amp_step(model, opt, scaler, dtype, x_b, x_lb, inject=None, unscale=False):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss_b = loss_of(model, x_b)
    scaler.scale(loss_b).backward()
    if inject == "b":
        model[0].weight.grad[2, 3] = float("inf")
    opt.stash_biased()
    with torch.autocast("cpu", dtype=dtype):
        loss_lb = loss_of(model, x_lb)
    scaler.scale(loss_lb).backward()
    if inject == "lb":
        model[2].bias.grad[1] = float("nan")
    if unscale:  # the documented way to clip: unscale_, then clip .grad (= g_lb)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    scaler.step(opt)
    scaler.update()


def unscaled_gradients(model, x, dtype, scale):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_of(model, x)
    (loss * scale).backward()
    grads = [p.grad.float() / scale for p in model.parameters()]
    model.zero_grad()
    return grads


def oracle_step(model, sgd, dtype, scale, x_b, x_lb, clip):
    g_b = unscaled_gradients(model, x_b, dtype, scale)
    g_lb = unscaled_gradients(model, x_lb, dtype, scale)
    if clip:  # torch.nn.utils.clip_grad_norm_'s formula
        norm = torch.stack([g.norm() for g in g_lb]).norm()
        g_lb = [g * torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0) for g in g_lb]
    for p, gb, glb in zip(model.parameters(), g_b, g_lb):
        p.grad = (1 + BETA) * glb - BETA * gb
    sgd.step()


@pytest.mark.parametrize("kind", ["gerne", "wrapper"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale_+clip"])
def test_scaled_training_matches_the_unscaled_oracle(backend, kind, dtype, unscale):
    model, ref = make_model(), make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    opt = make_opt(kind, model, backend, scaler)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x_b, x_lb in make_batches(5):
        scale = scaler.get_scale()
        amp_step(model, opt, scaler, dtype, x_b, x_lb, unscale=unscale)
        oracle_step(ref, sgd, dtype, scale, x_b, x_lb, clip=unscale)
    assert scaler.get_scale() == 2.0 ** 14  # grew twice: no step was skipped
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gerne", "wrapper"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("which", ["b", "lb"])
@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale_+clip"])
def test_inf_in_either_batch_skips_and_backs_off(backend, kind, dtype, which, unscale):
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    opt = make_opt(kind, model, backend, scaler)
    (x_b, x_lb), = make_batches(1)
    amp_step(model, opt, scaler, dtype, x_b, x_lb)
    before = snapshot(model, optimizer_state(opt))
    amp_step(model, opt, scaler, dtype, x_b, x_lb, inject=which, unscale=unscale)
    assert_same(before, snapshot(model, optimizer_state(opt)))
    assert scaler.get_scale() == 2.0 ** 9
    assert opt.skipped_steps == 1 and not opt.has_stash()
    amp_step(model, opt, scaler, dtype, x_b, x_lb, unscale=unscale)
    assert scaler.get_scale() == 2.0 ** 9 and opt.skipped_steps == 1
    assert not torch.equal(before[0][0], model[0].weight.detach())


@pytest.mark.parametrize("kind", ["gerne", "wrapper"])
def test_a_driving_scaler_must_be_known(kind):
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = make_opt(kind, model, "reference", None)
    (x_b, x_lb), = make_batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        amp_step(model, opt, scaler, torch.bfloat16, x_b, x_lb)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="GradScaler"):
        make_opt(kind, model, "reference", object())
