"""Random sequences of optimizer calls agree with the reference path and fail only as documented.

Hypothesis draws a small model (parameters of assorted shapes, float32 and bfloat16 mixed), an
optimizer configuration and a sequence of calls: backward (set or accumulate .grad, sometimes
with an inf or NaN), the memory-lean backwards, stash_biased, step, zero_grad, state_dict with or
without a reload into a fresh optimizer, add_param_group (valid, invalid or a duplicate) and
scheduled changes of lr and beta (valid or not). The same sequence drives the backend under test
and the reference backend, each on its own copy of the model. After every call:

* both raised the same exception or neither did, and an exception is one of the documented ones
  (DOCUMENTED below), raised before anything changed: parameters, gradients, optimizer state and
  param groups are exactly as before the call;
* parameters, gradients, optimizer state, the stash and the skip counter agree within the
  dtype's tolerance.
"""

import contextlib
import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gerne_kernels as gk

INF, NAN = float("inf"), float("nan")

DOCUMENTED = {
    RuntimeError: [r"stash_biased\(\) was called twice", r"found no gradients",
                   r"needs the biased batch's gradient", r"parameter list changed",
                   r"a step uses one mode",
                   r"memory-lean mode: step\(\) needs both", r"beta changed"],
    ValueError: [r"Invalid (learning rate|weight_decay|momentum|eps|betas)",
                 r"beta\b.* is below -1", r"more than one parameter group",
                 r"memory-lean mode scales each loss by one beta"],
    TypeError: [],
}

SHAPES = [(1,), (5,), (16,), (17,), (3, 7), (2, 3, 5), (33,), (0,), (40000,)]
DTYPES = [torch.float32, torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}

param_specs = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES))

sgd_configs = st.fixed_dictionaries({
    "optimizer": st.just("sgd"), "lr": st.sampled_from([0.01, 0.1]),
    "momentum": st.sampled_from([0.0, 0.9]), "dampening": st.sampled_from([0.0, 0.3]),
    "nesterov": st.booleans(), "weight_decay": st.sampled_from([0.0, 0.01]),
    "maximize": st.booleans()}).map(
        lambda c: dict(c, nesterov=c["nesterov"] and c["momentum"] > 0 and c["dampening"] == 0))
adam_configs = st.fixed_dictionaries({
    "optimizer": st.sampled_from(["adam", "adamw"]), "lr": st.sampled_from([1e-3, 1e-2]),
    "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9)]), "eps": st.sampled_from([1e-8, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.1]), "amsgrad": st.booleans(),
    "maximize": st.booleans()})
configs = st.tuples(st.one_of(sgd_configs, adam_configs),
                    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]))

seeds = st.integers(0, 2**31 - 1)
subsets = st.integers(1, 2**12 - 1)  # bit i set: parameter i takes part
poison = st.sampled_from([None, None, None, INF, -INF, NAN])
group_changes = st.sampled_from([{}, {"lr": 0.05}, {"beta": 2.0}, {"beta": -1.0},
                                 {"lr": -1.0}, {"beta": -3.0}, {"weight_decay": -0.1},
                                 "duplicate"])
calls = st.one_of(
    st.tuples(st.just("full_step"), seeds, subsets, subsets, poison, poison),
    st.tuples(st.just("full_step"), seeds, subsets, subsets, poison, poison),
    st.tuples(st.just("full_step"), seeds, subsets, subsets, poison, poison),
    st.tuples(st.just("backward"), seeds, subsets, poison),
    st.tuples(st.just("backward"), seeds, subsets, poison),
    st.tuples(st.just("stash_biased")),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("zero_grad"), st.booleans()),
    st.tuples(st.just("lean"), st.sampled_from(["b", "lb"]), seeds, subsets),
    st.tuples(st.just("checkpoint"), st.booleans()),
    st.tuples(st.just("add_param_group"), param_specs, seeds, group_changes),
    st.tuples(st.just("set"), st.sampled_from(["lr", "beta"]),
              st.sampled_from([0.0, 0.02, 0.5, 2.0, -2.0])),
)


class Run:
    """One optimizer and its own copy of the parameters."""

    def __init__(self, specs, seed, config, beta, backend):
        self.config, self.beta, self.backend = config, beta, backend
        self.params = [make_param(spec, seed + i) for i, spec in enumerate(specs)]
        self.opt = self.new_optimizer([{"params": list(self.params)}])

    def new_optimizer(self, groups):
        return gk.GERNE(groups, beta=self.beta, backend=self.backend, skip_nonfinite=True,
                        **self.config)

    # Each call below does the same thing to both runs.

    def backward(self, seed, subset, bad=None):
        for i, p in enumerate(self.params):
            if not subset >> (i % 12) & 1:
                continue
            g = gradient(p, seed + i)
            if bad is not None and g.numel():
                g.view(-1)[seed % g.numel()] = bad
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def stash_biased(self):
        self.opt.stash_biased()

    def step(self):
        self.opt.step()

    def zero_grad(self, set_to_none):
        self.opt.zero_grad(set_to_none=set_to_none)

    def lean(self, which, seed, subset):
        """loss = sum_i <p_i, r_i>: its gradient is r_i, scaled by -beta or 1 + beta."""
        terms = [(p.float() * gradient(p, seed + i).float()).sum()
                 for i, p in enumerate(self.params) if subset >> (i % 12) & 1]
        loss = torch.stack(terms).sum() if terms else None
        if loss is None:
            return
        if which == "b":
            self.opt.backward_biased(loss)
        else:
            self.opt.backward_less_biased(loss)

    def checkpoint(self, reload):
        saved = copy.deepcopy(self.opt.state_dict())
        if reload:
            fresh = self.new_optimizer([{"params": list(g["params"])}
                                        for g in self.opt.param_groups])
            fresh.load_state_dict(saved)
            self.opt = fresh

    def add_param_group(self, spec, seed, change):
        if change == "duplicate":
            self.opt.add_param_group({"params": [self.params[0]]})
            return
        p = make_param(spec, seed)
        self.opt.add_param_group({"params": [p], **change})
        self.params.append(p)

    def set(self, key, value):
        for group in self.opt.param_groups:
            group[key] = value

    def snapshot(self):
        """Everything a call may change, copied."""
        with single_threaded():
            return clone_tree({
                "params": [p.detach() for p in self.params],
                "grads": [p.grad for p in self.params],
                "state": self.opt.state_dict(),
                "stash": self.opt.has_stash(),
                "skipped": self.opt.skipped_steps,
            })


def make_param(spec, seed):
    shape, dtype = spec
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


def gradient(p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=gen).to(p.dtype)


def documented(exc):
    patterns = DOCUMENTED.get(type(exc))
    return patterns is not None and any(re.search(pat, str(exc)) for pat in patterns)


@contextlib.contextmanager
def single_threaded():
    """The checks run on one thread: on a loaded 2-core machine a parallel region over a small
    tensor can stall for tens of milliseconds, which adds up over thousands of comparisons. The
    optimizer calls under test keep all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: clone_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tree(value) for value in tree)
    return copy.deepcopy(tree)


def paired_leaves(a, b, path=""):
    """Yields (path, a_leaf, b_leaf) for the tensors; asserts that the rest is equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {getattr(b, 'dtype', b)}"
        yield path, a, b
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {a.keys()} vs {b}"
        for key in a:
            yield from paired_leaves(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from paired_leaves(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a} vs {b}"


def assert_trees_close(a, b, where, exact=False):
    """Tensors equal within their dtype's tolerance (exact=True: bit for bit), NaN equal to NaN;
    everything else equal. One float64 comparison per dtype."""
    with single_threaded():
        by_dtype = {}
        for path, x, y in paired_leaves(a, b, where):
            by_dtype.setdefault(x.dtype, []).append((path, x, y))
        for dtype, leaves in by_dtype.items():
            x = torch.cat([leaf[1].reshape(-1).double() for leaf in leaves])
            y = torch.cat([leaf[2].reshape(-1).double() for leaf in leaves])
            ok = (x == y) | (torch.isnan(x) & torch.isnan(y))
            if not exact and dtype.is_floating_point:
                tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
                ok |= (x - y).abs() <= tol["atol"] + tol["rtol"] * y.abs()
            if bool(ok.all()):
                continue
            first = int(torch.nonzero(~ok)[0])
            offset = 0
            for path, leaf, _ in leaves:
                if first < offset + leaf.numel():
                    raise AssertionError(f"{path}[{first - offset}] differs: "
                                         f"{float(x[first])} vs {float(y[first])}")
                offset += leaf.numel()


def primitive_calls(call):
    """A full step is five calls, each checked on its own."""
    if call[0] != "full_step":
        return [call]
    _, seed, subset_b, subset_lb, poison_b, poison_lb = call
    return [("zero_grad", True), ("backward", seed, subset_b, poison_b), ("stash_biased",),
            ("backward", seed + 7919, subset_lb, poison_lb), ("step",)]


def apply(run, call):
    """Runs one call; returns the exception it raised, or None."""
    name, *args = call
    before = run.snapshot()
    try:
        getattr(run, name)(*args)
    except Exception as exc:  # noqa: BLE001 (checked against the documented errors)
        assert documented(exc), f"{call} raised an undocumented {type(exc).__name__}: {exc}"
        assert_trees_close(before, run.snapshot(), f"{call} raised {exc!r}, yet",
                           exact=True)
        return exc
    return None


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=st.lists(param_specs, min_size=1, max_size=5), seed=seeds, config=configs,
       sequence=st.lists(calls, min_size=3, max_size=30))
def test_random_call_sequences_agree_with_the_reference(backend, specs, seed, config, sequence):
    kwargs, beta = config
    tested = Run(specs, seed, kwargs, beta, backend)
    oracle = Run(specs, seed, kwargs, beta, "reference")
    for i, call in enumerate(c for macro in sequence for c in primitive_calls(macro)):
        got, expected = apply(tested, call), apply(oracle, call)
        where = f"call {i} {call}"
        assert type(got) is type(expected), f"{where}: {backend} raised {got!r}, " \
                                            f"reference {expected!r}"
        if got is not None:
            assert str(got) == str(expected), where
        assert_trees_close(tested.snapshot(), oracle.snapshot(), where)
        event(f"{call[0]}: {type(got).__name__ if got is not None else 'ok'}")
    event(f"steps skipped for inf/NaN: {min(tested.opt.skipped_steps, 2)}"
          f"{'+' if tested.opt.skipped_steps > 2 else ''}")
