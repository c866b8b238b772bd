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
    (dict(optimizer="rmsprop"), ValueError, ["optimizer"]),
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


@pytest.mark.parametrize("change,words", [
    (lambda group: group.__setitem__("lr", -0.5), "lr"),
    (lambda group: group["betas"].__setitem__(1, 1.5), "betas"),   # a list changed in place
    (lambda group: group.__setitem__("eps", -1e-8), "eps"),
])
def test_a_hyperparameter_changed_after_earlier_steps_is_checked_again(change, words):
    """Each step checks its groups (remembering the values that passed): a value changed
    after steps have run is refused before anything changes."""
    ps = params()
    opt = gk.GERNE(ps, optimizer="adamw", lr=0.1, betas=[0.9, 0.999])
    for _ in range(2):
        backward_both(opt, ps)
        opt.step()
    change(opt.param_groups[0])
    backward_both(opt, ps)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=words):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = gk.GERNE(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.stash_biased()


@pytest.mark.parametrize("kind,torch_cls,hyper", [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
])
def test_complex_parameters_step_as_torch_optim_does(backend, kind, torch_cls, hyper):
    """torch.optim updates a complex parameter as its real pairs (view_as_real); so does GERNE,
    here with g_b == g_lb at beta = 1.5 (g is then the gradient itself)."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = gk.GERNE([p], optimizer=kind, beta=1.5, backend=backend, **hyper)
    ref = torch_cls([q], **hyper)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.complex64)
        p.grad = g.clone()
        opt.stash_biased()
        p.grad = g.clone()
        opt.step()
        q.grad = g.clone()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["momentum_buffer" if kind == "sgd" else "exp_avg"].is_complex()


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


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(lr="0.1"), TypeError, ["lr", "real number"]),
    (dict(lr=float("nan")), ValueError, ["lr"]),
    (dict(weight_decay=float("nan")), ValueError, ["weight_decay", ">= 0"]),
    (dict(momentum=float("nan")), ValueError, ["momentum", ">= 0"]),
    (dict(dampening="none"), TypeError, ["dampening"]),
    (dict(beta=float("inf")), ValueError, ["beta", "finite"]),
    (dict(beta="1"), TypeError, ["beta", "real number"]),
    (dict(beta_bounds=(2.0, 1.0)), ValueError, ["beta_bounds", "low <= high"]),
    (dict(beta_bounds=0.5), ValueError, ["beta_bounds", "pair"]),
])
def test_malformed_hyperparameters_name_themselves(kwargs, exc, words):
    with pytest.raises(exc) as info:
        gk.GERNE(params(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_adam_betas_that_are_not_a_pair():
    with pytest.raises(ValueError, match=r"betas must be a pair"):
        gk.GERNE(params(), optimizer="adam", betas=0.9)


@pytest.mark.parametrize("make,group", [
    ("gerne", {"lr": -1.0}), ("gerne", {"beta": -2.0}), ("gerne", {"beta": float("inf")}),
    ("wrapper", {"beta": -2.0}), ("wrapper", {"beta": float("inf")}),
])
def test_refused_param_group_leaves_no_trace(make, group):
    ps = params()
    if make == "gerne":
        opt = gk.GERNE(ps[:1], lr=0.1, momentum=0.9)
    else:
        opt = gk.GERNEWrapper(torch.optim.SGD(ps[:1], lr=0.1, momentum=0.9), beta=1.0)
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [ps[1]], **group})
    assert len(opt.param_groups) == 1
    backward_both(opt, ps[:1])
    opt.step()  # the optimizer still works, and the refused parameter is not in it
    assert ps[1] not in opt.state


def test_backend_that_cannot_run_one_bucket_fails_before_any_bucket_changes():
    """float32 runs on the cpu backend, float64 cannot: nothing is updated, float32 included."""
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = gk.GERNE([a, b], lr=0.1, momentum=0.9, backend="cpu")
    backward_both(opt, [a, b])
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises((TypeError, RuntimeError), match="backend='reference'|unavailable"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert "momentum_buffer" not in opt.state.get(a, {})


def test_sparse_less_biased_gradient_names_the_parameter():
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = gk.GERNE([p], lr=0.1)
    p.grad = torch.ones(10, 3)
    opt.stash_biased()
    p.grad = torch.ones(10, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"g_lb of a parameter of shape \(10, 3\) is sparse"):
        opt.step()


def test_backend_for_another_device_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    opt = gk.GERNE([p], lr=0.1, backend="cuda")
    backward_both(opt, [p])
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        opt.step()
