"""Bad input gets an error that names the parameter and the fix, before anything changes."""

import pytest
import torch

import gerne_kernels as gk


def params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(beta=-1.5), ValueError, ["beta", "-1"]),
    (dict(beta=float("nan")), TypeError, ["beta"]),
    (dict(beta=2.0, beta_bounds=(-1.0, 1.22)), ValueError, ["beta", "1.22"]),
    (dict(lr=-0.1), ValueError, ["lr"]),
    (dict(momentum=-0.5), ValueError, ["momentum"]),
    (dict(nesterov=True), ValueError, ["nesterov", "momentum"]),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, ["nesterov", "dampening"]),
    (dict(weight_decay=-1.0), ValueError, ["weight_decay"]),
    (dict(betas=(0.9, 0.999)), TypeError, ["betas", "accepted"]),
    (dict(optimizer="lion"), ValueError, ["optimizer"]),
    (dict(backend="tpu"), ValueError, ["backend"]),
])
def test_constructor_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        gk.GERNE(params(), **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(betas=(1.0, 0.999)), ["betas[0]"]),
    (dict(betas=(0.9, -0.1)), ["betas[1]"]),
    (dict(eps=-1e-8), ["eps"]),
])
def test_adam_hyperparameter_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        gk.GERNE(params(), optimizer="adam", **kwargs)
    for word in words:
        assert word in str(info.value)


def test_beta_bounds_message_names_its_source():
    class Bounds(tuple):
        source = "Eq. 9 from group counts, c=0.5"
    with pytest.raises(ValueError, match="Eq. 9 from group counts"):
        gk.GERNE(params(), beta=5.0, beta_bounds=Bounds((-1.0, 1.22)))


def backward_both(opt, ps, stash=True):
    opt.zero_grad()
    sum(p.sum() for p in ps).backward()
    if stash:
        opt.stash_biased()
    sum((2 * p).sum() for p in ps).backward()


def test_step_without_stash_says_what_to_call():
    ps = params()
    opt = gk.GERNE(ps, lr=0.1, beta=1.0)
    backward_both(opt, ps, stash=False)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="stash_biased"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_stash_twice_is_an_error():
    ps = params()
    opt = gk.GERNE(ps, lr=0.1)
    sum(p.sum() for p in ps).backward()
    opt.stash_biased()
    sum(p.sum() for p in ps).backward()
    with pytest.raises(RuntimeError, match="twice"):
        opt.stash_biased()


def test_stash_without_gradients():
    opt = gk.GERNE(params(), lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.stash_biased()


def test_scheduled_beta_out_of_bounds_fails_before_changing_anything():
    ps = params()
    opt = gk.GERNE(ps, lr=0.1, beta=1.0, beta_bounds=(-1.0, 2.0))
    backward_both(opt, ps)
    opt.param_groups[0]["beta"] = 2.5
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="outside"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = gk.GERNE(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.stash_biased()


def test_complex_parameters_are_refused():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = gk.GERNE([p], lr=0.1)
    p.abs().sum().backward()
    opt.stash_biased()
    p.abs().sum().backward()
    with pytest.raises(TypeError, match="view_as_real"):
        opt.step()


def test_parameter_list_changed_between_stash_and_step():
    ps = params()
    opt = gk.GERNE(ps[:1], lr=0.1)
    ps[0].sum().backward()
    opt.stash_biased()
    opt.add_param_group({"params": [ps[1]]})
    ps[0].sum().backward()
    with pytest.raises(RuntimeError, match="parameter list changed"):
        opt.step()


def test_mismatched_gradient_dtype_is_refused():
    ps = params()
    opt = gk.GERNE(ps, lr=0.1)
    backward_both(opt, ps)
    opt.state[ps[1]]["grad_b"] = opt.state[ps[1]]["grad_b"].double()  # e.g. a bad checkpoint
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()


def test_explicit_backend_for_wrong_device_or_dtype():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = gk.GERNE([p], lr=0.1, backend="cpu")
    p.sum().backward()
    opt.stash_biased()
    p.sum().backward()
    with pytest.raises((TypeError, RuntimeError), match="reference|unavailable"):
        opt.step()
