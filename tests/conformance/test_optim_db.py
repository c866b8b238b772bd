"""torch's own optimizer test inputs, run through GERNE against torch.optim.

``torch.testing._internal.common_optimizers.optim_db`` lists the OptimizerInputs that torch's
test_optim runs SGD, Adam and AdamW with. For each of them, GERNE is torch.optim:

* with beta = 0 (the plain update of .grad), and
* with g_b == g_lb at beta != 0, since (1 + beta) g - beta g = g: the same loss backwarded
  twice, in the stash mode (beta = 1, and a beta that is no power of two), the memory-lean
  mode, the one-backward mode and GERNEWrapper around the torch.optim optimizer itself,

each also with torch.optim's implementation flags (foreach=True, fused=True: GERNE accepts them;
the oracle runs torch's foreach or fused implementation). The loop follows test_optim's
``_compare_between``: a small model plus a 0-dim parameter, here also test_optim's
non-contiguous parameters (``torch.randn(10, 5, 2)[..., 0]``); six steps, one of them with
every gradient None, a layer frozen for two; lr as a tensor where the input gives one.
Parameters and the whole optimizer state are compared after every step.

Tolerance: float32 ulps of the larger value, for parameters of at least lr: a step moves a
parameter by up to about lr (Adam), so rounding the update costs an ulp of lr, which is many
ulps of a parameter far smaller than lr (torch's own fused and for-loop Adam differ by 16 ulps
of such a parameter in this loop, by 2 ulps of lr). ``EXACT_ULPS`` where g_b == g_lb makes g
exact (beta = 0 or 1): what is left is rounding of the update itself (fma contraction in the fused
kernels and torch's foreach/fused paths, lr / bias correction formed in float64 or float32).
``ROUNDED_ULPS`` for beta = 0.7, where (1.7 g) - (0.7 g) rounds g by an ulp at each step.

The inputs torch lists for CUDA only (capturable, tensor betas) run here on CPU tensors too:
GERNE accepts capturable=True on any device (its step is always capturable); the oracle runs
them without it, since torch.optim refuses capturable=True for CPU parameters, which changes
its implementation, not its math.
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("expecttest", reason="torch's common_optimizers imports it (the test extra)")
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

import gerne_kernels as gk  # noqa: E402
from conformance.helpers import assert_states_ulps, assert_tensors_ulps  # noqa: E402
from gerne_kernels.base_optimizers import REGISTRY  # noqa: E402

NAMES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
INFOS = [info for info in optim_db if info.optim_cls in NAMES]
EXACT_ULPS = 4
ROUNDED_ULPS = 16
ITERATIONS = 6

# Keys of an input that GERNE cannot express, each with the reason (the test is skipped with
# it). torch 2.14's inputs for SGD, Adam and AdamW have none: every hyperparameter maps,
# and the implementation flags are accepted.
INEXPRESSIBLE = {}


def db_inputs(device):
    return [(info.optim_cls, oi) for info in INFOS for oi in info.optim_inputs_func(device=device)]


CPU_INPUTS = db_inputs("cpu")
CUDA_ONLY_INPUTS = [(cls, oi) for cls, oi in db_inputs("cuda")
                    if (cls, oi.desc) not in {(c, o.desc) for c, o in CPU_INPUTS}]


def input_id(case):
    cls, oi = case
    return f"{cls.__name__}-{oi.desc}"


def gerne_kwargs(torch_cls, kwargs):
    """(optimizer name, GERNE kwargs) for a torch.optim class and its kwargs; skips the test,
    with the reason, for what GERNE cannot express."""
    kwargs = copy.deepcopy(dict(kwargs))
    name = NAMES[torch_cls]
    if torch_cls is torch.optim.Adam and kwargs.pop("decoupled_weight_decay", False):
        name = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW, with Adam's default decay
        kwargs.setdefault("weight_decay", 0.0)
    for key in kwargs:
        if key in INEXPRESSIBLE:
            pytest.skip(f"{torch_cls.__name__}({key}=...): {INEXPRESSIBLE[key]}")
        if key not in REGISTRY[name].defaults:
            pytest.skip(f"{torch_cls.__name__}({key}={kwargs[key]!r}) has no GERNE "
                        f"counterpart: GERNE(optimizer={name!r}) takes "
                        f"{sorted(REGISTRY[name].defaults)}")
    return name, kwargs


X = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
V = torch.linspace(-1.0, 1.0, 5)


def build():
    """test_optim's model (Linear-Sigmoid-Linear-Sigmoid), a 0-dim parameter and test_optim's
    non-contiguous weight and bias (views with gaps)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())
    scalar = nn.Parameter(torch.tensor(0.25))
    weight = nn.Parameter(torch.randn(10, 5, 2)[..., 0])
    bias = nn.Parameter(torch.randn(10, 2)[..., 0])
    assert not weight.is_contiguous() and not bias.is_contiguous()
    return model, [*model.parameters(), scalar], [weight, bias]


def loss_of(model, dense, views):
    scalar, (weight, bias) = dense[-1], views
    return model(X).sum() + (3 * scalar).sin() + 0.1 * (weight.mv(V) + bias).pow(2).sum()


def param_groups(dense, views, impl):
    """One group, or with fused=True two: torch's fused CPU kernels write the wrong elements of
    non-contiguous parameters (torch.optim.SGD([torch.randn(10, 5, 2)[..., 0]], fused=True)
    misses the update), so those take the for-loop path in a group of their own, in both
    optimizers."""
    if impl == "fused":
        return [{"params": dense}, {"params": views, "fused": False}]
    return dense + views


# variant: (how GERNE is fed, its beta, the ulps allowed)
VARIANTS = {
    "beta0": ("plain", 0.0, EXACT_ULPS),
    "stash": ("stash", 1.0, EXACT_ULPS),
    "stash-beta0.7": ("stash", 0.7, ROUNDED_ULPS),
    "lean": ("lean", 1.0, EXACT_ULPS),
    "one_backward": ("one_backward", 1.0, EXACT_ULPS),
    "wrapper": ("wrapper", 1.0, EXACT_ULPS),
}


def feed(opt, how, loss):
    """The gradients of one step; g_b == g_lb: the same loss twice."""
    if how == "plain":
        loss().backward()
    elif how in ("stash", "wrapper"):
        loss().backward()
        opt.stash_biased()
        loss().backward()
    elif how == "lean":
        opt.backward_biased(loss())
        opt.backward_less_biased(loss())
    else:
        opt.extrapolated_loss(loss(), loss()).backward()


def run_against_torch(torch_cls, kwargs, variant, impl, backend, oracle_drops=()):
    how, beta, ulps = VARIANTS[variant]
    kwargs = dict(kwargs, **({impl: True} if impl else {}))
    name, gerne_kw = gerne_kwargs(torch_cls, kwargs)
    torch_kw = {k: v for k, v in copy.deepcopy(kwargs).items() if k not in oracle_drops}
    ref_model, ref_dense, ref_views = build()
    model, dense, views = build()
    ref = torch_cls(param_groups(ref_dense, ref_views, impl), **torch_kw)
    if how == "wrapper":
        opt = gk.GERNEWrapper(torch_cls(param_groups(dense, views, impl), **torch_kw),
                              beta=beta, backend=backend)
    else:
        opt = gk.GERNE(param_groups(dense, views, impl), optimizer=name, beta=beta,
                       backend=backend, **gerne_kw)
    lr = float(ref.param_groups[0]["lr"])
    for i in range(ITERATIONS):
        for m, o in ((ref_model, ref), (model, opt)):
            o.zero_grad()
            if i == 3:  # a frozen layer: its gradients stay None for two steps
                m[2].requires_grad_(False)
            if i == 5:
                m[2].requires_grad_(True)
        if i != 2:  # step 2: every gradient is None, the step changes nothing
            ref_model_loss = loss_of(ref_model, ref_dense, ref_views)
            ref_model_loss.backward()
            feed(opt, how, lambda: loss_of(model, dense, views))
        ref.step()
        opt.step()
        assert_tensors_ulps(dense + views, ref_dense + ref_views, ulps,
                            f"after step {i}: parameter", floor=lr)
        assert_states_ulps(opt.state_dict()["state"], ref.state_dict()["state"], ulps)
    assert not opt.has_stash() and opt.skipped_steps == 0


# Every variant with torch's default implementation; beta0 and stash also against torch's
# foreach and fused implementations (the flags change torch's side, GERNE's accepts them).
RUNS = ([(variant, None) for variant in sorted(VARIANTS)]
        + [(variant, impl) for variant in ("beta0", "stash") for impl in ("foreach", "fused")])


@pytest.mark.parametrize("variant,impl", RUNS, ids=[f"{v}-{i or 'default'}" for v, i in RUNS])
@pytest.mark.parametrize("case", CPU_INPUTS, ids=input_id)
def test_matches_torch_optim(backend, case, variant, impl):
    torch_cls, oi = case
    run_against_torch(torch_cls, oi.kwargs, variant, impl, backend)


@pytest.mark.parametrize("variant", ["beta0", "stash"])
@pytest.mark.parametrize("case", CUDA_ONLY_INPUTS, ids=input_id)
def test_cuda_only_inputs_on_cpu_tensors(backend, case, variant):
    torch_cls, oi = case
    run_against_torch(torch_cls, oi.kwargs, variant, None, backend,
                      oracle_drops=("capturable",))


def test_inputs_are_there():
    """The loops above run on something: optim_db lists SGD, Adam and AdamW inputs."""
    counts = {cls.__name__: sum(c is cls for c, _ in CPU_INPUTS) for cls in NAMES}
    assert all(n >= 5 for n in counts.values()), counts
    assert {"tensor lr", "nesterov", "dampening", "maximize", "amsgrad"} <= {
        oi.desc for _, oi in CPU_INPUTS}


@pytest.mark.parametrize("case", CPU_INPUTS, ids=input_id)
def test_differentiable_true_is_refused(case):
    torch_cls, oi = case
    name, kwargs = gerne_kwargs(torch_cls, oi.kwargs)
    _, dense, views = build()
    with pytest.raises(ValueError, match="differentiable=True.*cannot be differentiated"):
        gk.GERNE(dense + views, optimizer=name, differentiable=True, **kwargs)
    gk.GERNE(dense + views, optimizer=name, differentiable=False, **kwargs)


@pytest.mark.parametrize("torch_cls", sorted(NAMES, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_defaults_are_torch_optims(torch_cls):
    """GERNE's defaults for each optimizer are torch.optim's, key for key (plus beta,
    beta_bounds and torch's implementation flags), so that an input that leaves a
    hyperparameter out means the same in both."""
    _, dense, views = build()
    ref = torch_cls(dense + views)
    opt = gk.GERNE(dense + views, optimizer=NAMES[torch_cls])
    expected = ref.defaults
    assert {k: opt.defaults[k] for k in expected if k in opt.defaults} == expected
    extra = set(opt.defaults) - set(expected)
    assert extra <= {"beta", "beta_bounds", "foreach", "fused", "capturable", "differentiable"}


# torch.optim gained these flags over the years; test_optim's test_can_load_older_state_dict
# removes them from a checkpoint's groups, loads it and steps on.
NEWER_FLAGS = ("maximize", "foreach", "fused", "differentiable", "capturable",
               "decoupled_weight_decay")


def without_newer_flags(state_dict):
    older = copy.deepcopy(state_dict)
    for group in older["param_groups"]:
        for flag in NEWER_FLAGS:
            group.pop(flag, None)
    return older


@pytest.mark.parametrize("wrapped", [False, True], ids=["gerne", "wrapper"])
@pytest.mark.parametrize("case", CPU_INPUTS, ids=input_id)
def test_can_load_older_state_dict(backend, case, wrapped):
    """After a step, a checkpoint whose groups lack torch.optim's newer flags loads (the flags
    take their defaults) and the run steps on as torch.optim's does from its own such
    checkpoint."""
    torch_cls, oi = case
    name, kwargs = gerne_kwargs(torch_cls, oi.kwargs)
    ref_model, ref_dense, ref_views = build()
    model, dense, views = build()
    ref = torch_cls(ref_dense + ref_views, **copy.deepcopy(oi.kwargs))
    if wrapped:
        opt = gk.GERNEWrapper(torch_cls(dense + views, **copy.deepcopy(oi.kwargs)), beta=1.0,
                              backend=backend)
    else:
        opt = gk.GERNE(dense + views, optimizer=name, beta=1.0, backend=backend, **kwargs)
    for i in range(3):
        for o in (opt, ref):
            o.zero_grad()
        feed(opt, "stash", lambda: loss_of(model, dense, views))
        loss_of(ref_model, ref_dense, ref_views).backward()
        opt.step()
        ref.step()
        if i == 0:
            opt.load_state_dict(without_newer_flags(opt.state_dict()))
            ref.load_state_dict(without_newer_flags(ref.state_dict()))
            for flag in ("maximize", "differentiable", "decoupled_weight_decay"):
                if flag in ref.param_groups[0]:  # the flags that change the math: as torch's
                    assert opt.param_groups[0][flag] == ref.param_groups[0][flag], flag
    assert_tensors_ulps(dense + views, ref_dense + ref_views, EXACT_ULPS,
                        floor=float(ref.param_groups[0]["lr"]))
    assert_states_ulps(opt.state_dict()["state"], ref.state_dict()["state"], EXACT_ULPS)
