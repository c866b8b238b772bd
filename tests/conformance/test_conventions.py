"""torch.optim's conventions, kept by GERNE and GERNEWrapper.

* deepcopy and pickle (fresh, after steps, with a stash pending): the copy steps bit for bit as
  the original does, and independently of it;
* LR schedulers that cycle momentum (OneCycleLR, CyclicLR with cycle_momentum) find momentum or
  betas in the defaults and move them through the wrapper (SGD momentum, Adam betas) and
  through GERNE, exactly as on the bare torch.optim optimizer stepped on (1 + beta) g_lb -
  beta g_b;
* meta-device parameters step as torch.optim's do: state created on meta, no error;
* a checkpoint whose Adam "step" is a Python float (older torch.optim) loads and continues
  exactly as one with a tensor step, and as torch.optim continues it;
* zero_grad(set_to_none=False) leaves .grad as zeros, in place, where torch.optim does;
* torch.optim's implementation flags (foreach, fused, capturable, differentiable) as configs
  and timm's create_optimizer_v2 pass them are accepted, differentiable=True refused clearly.
"""

import copy
import io
import pickle

import pytest
import torch

import gerne_kernels as gk
from conformance.helpers import extrapolated, gerne_step, plain_steps, state_of
from gerne_testing import loss_of, make_batches, make_model

BETA = 0.75


def batches(steps, seed=5):
    return make_batches(steps, seed=seed)


def step(model, opt, x_b, x_lb, mode="stash"):
    gerne_step(opt, mode, lambda: loss_of(model, x_b), lambda: loss_of(model, x_lb))


def torch_step(model, opt, x_b, x_lb, beta=BETA):
    """torch.optim stepped on (1 + beta) g_lb - beta g_b (the oracle)."""
    params = list(model.parameters())
    g_b = torch.autograd.grad(loss_of(model, x_b), params)
    g_lb = torch.autograd.grad(loss_of(model, x_lb), params)
    for p, gb, glb in zip(params, g_b, g_lb):
        p.grad = extrapolated(gb, glb, beta, p.dtype)
    opt.step()
    opt.zero_grad()


def assert_equal_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------
# deepcopy and pickle

OPTIMIZERS = {
    "gerne-sgd": lambda ps, backend: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9,
                                              nesterov=True, beta=BETA, backend=backend),
    "gerne-adamw": lambda ps, backend: gk.GERNE(ps, optimizer="adamw", lr=1e-2, amsgrad=True,
                                                beta=BETA, backend=backend),
    "wrapper-adamw": lambda ps, backend: gk.GERNEWrapper(
        torch.optim.AdamW(ps, lr=1e-2), beta=BETA, backend=backend),
}
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("when", ["fresh", "after-steps", "stash-pending"])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_copies_step_as_the_original(backend, kind, when, how):
    model = make_model()
    opt = OPTIMIZERS[kind](model.parameters(), backend)
    data = batches(6)
    if when != "fresh":
        for x_b, x_lb in data[:2]:
            step(model, opt, x_b, x_lb)
    if when == "stash-pending":
        opt.zero_grad()
        loss_of(model, data[2][0]).backward()
        opt.stash_biased()
    model2, opt2 = COPIES[how]((model, opt))  # together, as torch.optim objects are copied
    assert type(opt2) is type(opt)
    assert all(p is q for p, q in zip(opt2._params(), model2.parameters()))
    assert opt2.has_stash() == opt.has_stash()
    if isinstance(opt2, gk.GERNEWrapper):
        assert opt2.param_groups is opt2.base.param_groups  # still one list with its base
    for p, q in zip(opt._params(), opt2._params()):  # the copy shares no tensor
        for state, state2 in ((opt.state, opt2.state), (state_of(opt, p), state_of(opt2, q))):
            for key, value in state.get(p, {}).items() if state is opt.state else state.items():
                if torch.is_tensor(value):
                    copied = (state2[q] if state2 is opt2.state else state2)[key]
                    assert copied.data_ptr() != value.data_ptr() and torch.equal(copied, value)
    # The copy first: a step of the copy must not consume the original's stash.
    for m, o in ((model2, opt2), (model, opt)):
        if when == "stash-pending":
            assert o.has_stash()
            loss_of(m, data[2][1]).backward()
            o.step()
        for x_b, x_lb in data[3:]:
            step(m, o, x_b, x_lb)
    assert_equal_params(model, model2)
    assert opt.state_dict()["state"].keys() == opt2.state_dict()["state"].keys()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_deepcopy_copies_all_public_attrs(backend, kind):
    """test_optim's test_deepcopy_copies_all_public_attrs, after a step with statistics on."""
    model = make_model()
    opt = OPTIMIZERS[kind](model.parameters(), backend)
    opt.track_statistics, opt.max_grad_norm = True, 10.0
    step(model, opt, *batches(1)[0])

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}
    copied = copy.deepcopy(opt)
    assert public(copied) == public(opt)
    for key in public(opt) - {"state", "param_groups", "base", "base_optimizer", "defaults"}:
        assert getattr(copied, key) == getattr(opt, key), key
    assert copied.statistics is not None and copied.grad_norm is not None


def test_torch_save_of_the_whole_optimizer_round_trips(backend):
    """torch.save(opt) pickles the object itself (not a state_dict)."""
    model = make_model()
    opt = OPTIMIZERS["gerne-adamw"](model.parameters(), backend)
    data = batches(4)
    step(model, opt, *data[0])
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    model2, opt2 = torch.load(buffer, weights_only=False)
    for m, o in ((model, opt), (model2, opt2)):
        for x_b, x_lb in data[1:]:
            step(m, o, x_b, x_lb)
    assert_equal_params(model, model2)


# ------------------------------------------------------------------------------------------
# Schedulers that cycle momentum

BASES = {
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                     lambda ps, backend: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9,
                                                  beta=BETA, backend=backend)),
    "adam-betas": (lambda ps: torch.optim.Adam(ps, lr=1e-2),
                   lambda ps, backend: gk.GERNE(ps, optimizer="adam", lr=1e-2, beta=BETA,
                                                backend=backend)),
}
SCHEDULERS = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.2, total_steps=8),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=True,
        base_momentum=0.8, max_momentum=0.95),
}


def cycled(group):
    return group["momentum"] if "momentum" in group else group["betas"]


@pytest.mark.parametrize("through", ["wrapper", "gerne"])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("base", sorted(BASES))
def test_momentum_cycling_schedulers(backend, base, scheduler, through):
    make_base, make_gerne = BASES[base]
    model, ref = make_model(), make_model()
    if through == "wrapper":
        inner = make_base(model.parameters())
        opt = gk.GERNEWrapper(inner, beta=BETA, backend=backend)
        assert inner.defaults.items() <= opt.defaults.items()  # the base's defaults, and beta
    else:
        opt = make_gerne(model.parameters(), backend)
    ref_opt = make_base(ref.parameters())
    sched, ref_sched = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](ref_opt)
    seen = set()
    for x_b, x_lb in batches(7):
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert cycled(opt.param_groups[0]) == cycled(ref_opt.param_groups[0])
        if through == "wrapper":  # the base steps with what the scheduler set
            assert cycled(opt.base.param_groups[0]) == cycled(ref_opt.param_groups[0])
        seen.add(str(cycled(ref_opt.param_groups[0])))
        step(model, opt, x_b, x_lb)
        torch_step(ref, ref_opt, x_b, x_lb)
        sched.step()
        ref_sched.step()
    assert len(seen) >= 3  # the momentum did cycle
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Meta-device parameters

META_TORCH = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
              "adam": (torch.optim.Adam, dict(lr=1e-3)),
              "adamw": (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True))}
META_KEYS = {"lion": {"exp_avg"}}  # no torch.optim Lion: its state is exp_avg


def meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def meta_loss(model):
    return model(torch.empty(2, 4, device="meta")).sum()


def torch_state_on_meta(kind):
    cls, hyper = META_TORCH[kind]
    model = meta_model()
    opt = cls(model.parameters(), **hyper)
    meta_loss(model).backward()
    opt.step()
    return {key for key in opt.state[model[0].weight]}


# The wrapper steps a torch.optim optimizer, and torch.optim has no Lion.
META_RUNS = [(kind, mode) for kind in ("sgd", "adam", "adamw", "lion")
             for mode in ("stash", "lean", "one_backward", "wrapper")
             if kind in META_TORCH or mode != "wrapper"]


@pytest.mark.parametrize("skip_nonfinite", [None, True])  # True: the inf/NaN guard's reads
@pytest.mark.parametrize("kind,mode", META_RUNS)
def test_meta_parameters_step_as_torch_optims(kind, mode, skip_nonfinite):
    model = meta_model()
    if mode == "wrapper":
        cls, hyper = META_TORCH[kind]
        opt = gk.GERNEWrapper(cls(model.parameters(), **hyper), beta=BETA,
                              skip_nonfinite=skip_nonfinite)
        state = opt.base.state
    else:
        hyper = META_TORCH[kind][1] if kind in META_TORCH else {}
        opt = gk.GERNE(model.parameters(), optimizer=kind, beta=BETA,
                       skip_nonfinite=skip_nonfinite, **hyper)
        state = opt.state
    for _ in range(2):
        gerne_step(opt, mode, lambda: meta_loss(model), lambda: meta_loss(model))
    expected = META_KEYS.get(kind) or torch_state_on_meta(kind)
    for p in model.parameters():
        assert p.is_meta
        assert set(state[p]) == expected
        for key, value in state[p].items():
            if key != "step":  # torch.optim keeps a non-capturable step on the CPU
                assert value.is_meta and value.shape == p.shape, key
    assert not opt.has_stash() and opt.skipped_steps == 0
    assert len(opt.state_dict()["state"]) == 4


# ------------------------------------------------------------------------------------------
# A checkpoint with Adam's "step" as a Python float

ADAMS = {
    "gerne-adam": lambda ps: gk.GERNE(ps, optimizer="adam", lr=1e-2, weight_decay=0.1,
                                      beta=BETA),
    "gerne-adamw": lambda ps: gk.GERNE(ps, optimizer="adamw", lr=1e-2, amsgrad=True,
                                       beta=BETA),
    "wrapper-adam": lambda ps: gk.GERNEWrapper(torch.optim.Adam(ps, lr=1e-2), beta=BETA),
}


def with_float_steps(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for entry in state_dict["state"].values():
        entry["step"] = float(entry["step"])
    return state_dict


@pytest.mark.parametrize("kind", sorted(ADAMS))
def test_float_step_checkpoint_continues_as_a_tensor_step_one(kind):
    model = make_model()
    opt = ADAMS[kind](model.parameters())
    data = batches(6)
    for x_b, x_lb in data[:3]:
        step(model, opt, x_b, x_lb)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    runs = []
    for state_dict in (saved, with_float_steps(saved)):
        resumed = make_model(seed=2)
        resumed.load_state_dict(saved_model)
        resumed_opt = ADAMS[kind](resumed.parameters())
        resumed_opt.load_state_dict(state_dict)
        for x_b, x_lb in data[3:]:
            step(resumed, resumed_opt, x_b, x_lb)
        runs.append((resumed, resumed_opt))
    (a, a_opt), (b, b_opt) = runs
    assert_equal_params(a, b)
    for entry_a, entry_b in zip(a_opt.state_dict()["state"].values(),
                                b_opt.state_dict()["state"].values()):
        assert torch.is_tensor(entry_b["step"]) and torch.equal(entry_a["step"], entry_b["step"])


@pytest.mark.parametrize("kind,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_torch_optim_float_step_checkpoint_continues_as_torch_optim(backend, kind, cls):
    ref = make_model()
    ref_opt = cls(ref.parameters(), lr=1e-2)
    data = batches(5)
    for x_b, x_lb in data[:2]:
        torch_step(ref, ref_opt, x_b, x_lb)
    checkpoint = with_float_steps(ref_opt.state_dict())
    model = make_model(seed=2)
    model.load_state_dict(ref.state_dict())
    opt = gk.GERNE(model.parameters(), optimizer=kind, lr=1e-2, beta=BETA, backend=backend)
    opt.load_state_dict(copy.deepcopy(checkpoint))
    ref_opt.load_state_dict(copy.deepcopy(checkpoint))
    for p, q in zip(model.parameters(), ref.parameters()):  # a tensor once loaded, as torch's
        assert torch.is_tensor(opt.state[p]["step"]) and torch.is_tensor(ref_opt.state[q]["step"])
        assert torch.equal(opt.state[p]["step"], ref_opt.state[q]["step"])
    for x_b, x_lb in data[2:]:
        step(model, opt, x_b, x_lb)
        torch_step(ref, ref_opt, x_b, x_lb)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(opt.state[next(model.parameters())]["step"]) == 5.0


# ------------------------------------------------------------------------------------------
# zero_grad(set_to_none=False)

@pytest.mark.parametrize("mode", ["stash", "lean", "one_backward", "wrapper"])
def test_zero_grad_without_set_to_none_zeroes_in_place(backend, mode):
    """Against torch.optim's own loop with zero_grad(set_to_none=False): after every step, .grad
    is zeroed in place (the same tensor) where torch's is, and stays None where torch's does
    (a parameter no backward reaches)."""
    model, ref = make_model(), make_model()
    unused, ref_unused = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    params, ref_params = [*model.parameters(), unused], [*ref.parameters(), ref_unused]
    if mode == "wrapper":
        opt = gk.GERNEWrapper(torch.optim.SGD(params, lr=0.1, momentum=0.9), beta=BETA,
                              backend=backend)
    else:
        opt = gk.GERNE(params, optimizer="sgd", lr=0.1, momentum=0.9, beta=BETA,
                       backend=backend)
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    for i, (x_b, x_lb) in enumerate(batches(4)):
        held = [p.grad for p in params]
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
        for p, q, grad in zip(params, ref_params, held):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                assert p.grad is grad and not grad.any()
        if i == 3:
            break
        gerne_step(opt, "stash" if mode == "wrapper" else mode, lambda: loss_of(model, x_b),
                   lambda: loss_of(model, x_lb), set_to_none=False)
        ((1 + BETA) * loss_of(ref, x_lb) - BETA * loss_of(ref, x_b)).backward()
        ref_opt.step()
    assert unused.grad is None and sum(p.grad is not None for p in params) == 4
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_grad_without_set_to_none_discards_a_pending_stash(backend):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=0.1, beta=BETA, backend=backend)
    x_b, x_lb = batches(1)[0]
    step(model, opt, x_b, x_lb)
    loss_of(model, x_b).backward()
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    opt.zero_grad(set_to_none=False)
    assert not opt.has_stash() and not any("grad_b" in s for s in opt.state.values())
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


# ------------------------------------------------------------------------------------------
# torch.optim's implementation flags, as configs and timm pass them

CONFIGS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True,
                                  weight_decay=1e-4, maximize=False, foreach=None, fused=None,
                                  differentiable=False)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                                    amsgrad=False, maximize=False, foreach=False,
                                    capturable=False, differentiable=False, fused=None)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.05,
                                      amsgrad=True, foreach=True, fused=False)),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_config_dict_with_torch_flags_is_accepted(backend, kind):
    """The kwargs a config (Hydra, timm's optimizer_kwargs) gives torch.optim, as they are."""
    cls, config = CONFIGS[kind]
    model, ref = make_model(), make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=0.0, backend=backend,
                   **copy.deepcopy(config))
    ref_opt = cls(ref.parameters(), **copy.deepcopy(config))
    plain_steps([(model, opt), (ref, ref_opt)], [x for x, _ in batches(3)], loss_of)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# torch.optim.SGD takes no capturable flag (a TypeError, as GERNE(optimizer="sgd") gives).
FLAG_RUNS = [(kind, flag, value) for kind in ("sgd", "adam", "adamw", "lion")
             for flag, values in (("foreach", (None, True, False)), ("fused", (None, True, False)),
                                  ("capturable", (True, False)))
             for value in values if (kind, flag) != ("sgd", "capturable")]


@pytest.mark.parametrize("kind,flag,value", FLAG_RUNS)
def test_implementation_flags_are_accepted(kind, flag, value):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, **{flag: value})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], flag: not value})
    assert opt.defaults[flag] is value and opt.param_groups[1][flag] is (not value)


def test_sgd_refuses_capturable_as_torch_optim_does():
    with pytest.raises(TypeError):
        torch.optim.SGD(make_model().parameters(), capturable=True)
    with pytest.raises(TypeError, match="capturable"):
        gk.GERNE(make_model().parameters(), optimizer="sgd", capturable=True)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "lion"])
def test_differentiable_true_is_refused_clearly(kind):
    model = make_model()
    match = r"differentiable=True.*cannot be differentiated through"
    with pytest.raises(ValueError, match=match):
        gk.GERNE(model.parameters(), optimizer=kind, differentiable=True)
    with pytest.raises(ValueError, match=r"differentiable=True \(param group 0\)"):
        gk.GERNE([{"params": model.parameters(), "differentiable": True}], optimizer=kind)
    opt = gk.GERNE(model[0].parameters(), optimizer=kind)
    with pytest.raises(ValueError, match=r"differentiable=True \(param group 1\)"):
        opt.add_param_group({"params": model[2].parameters(), "differentiable": True})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="foreach"):
        gk.GERNE(model.parameters(), optimizer=kind, foreach="yes")


@pytest.fixture
def timm_registry(monkeypatch):
    """timm's optimizer registry with GERNE entries (removed after the test; timm reads an
    optimizer name's last "_"-separated part, so the names have none)."""
    factory = pytest.importorskip("timm.optim._optim_factory")
    registry = factory.default_registry
    for name, info in (("gernesgd", dict(opt_class=gk.GERNE, has_eps=False, has_momentum=True,
                                          defaults={"optimizer": "sgd", "beta": 0.0,
                                                    "nesterov": True})),
                       ("gerneadamw", dict(opt_class=gk.GERNE, has_betas=True,
                                            defaults={"optimizer": "adamw", "beta": 0.0}))):
        monkeypatch.setitem(registry._optimizers, name,
                            factory.OptimInfo(name=name, description="GERNE", **info))
    return factory


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_timm_create_optimizer_v2_builds_gerne(timm_registry, name, foreach):
    """timm's factory passes foreach (and builds its weight-decay param groups): the GERNE it
    builds at beta = 0 steps as the torch.optim optimizer it builds for the same arguments."""
    from timm.optim import create_optimizer_v2
    model, ref = make_model(), make_model()
    kwargs = dict(lr=0.05, weight_decay=1e-2, momentum=0.9, foreach=foreach)
    opt = create_optimizer_v2(model, f"gerne{name}", **kwargs)
    ref_opt = create_optimizer_v2(ref, name, **kwargs)
    assert isinstance(opt, gk.GERNE) and opt.optimizer_name == name
    assert [g["weight_decay"] for g in opt.param_groups] == [
        g["weight_decay"] for g in ref_opt.param_groups]
    if foreach is not None:
        assert all(g["foreach"] is foreach for g in opt.param_groups)
    plain_steps([(model, opt), (ref, ref_opt)], [x for x, _ in batches(3)], loss_of)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
