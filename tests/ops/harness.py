"""The one harness of the op tests (tests/ops): the backends, the problems each op runs on, the
oracle every result is held against, and the tolerances.

Backends. ``BACKENDS`` holds every backend of ``gerne_kernels._backends`` once, as a ``Backend``:
its name, the device of its tensors, its ops (``backend.op("sgd_step_")``), whether it runs here
(``backend.require()`` skips a test with the reason, or fails it where the backend must run) and
its ``SizeProfile``. ``triton`` runs on CUDA tensors where a GPU is visible, else on CPU tensors
in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton); the interpreter runs one program at a time in numpy, so its profile is small.

Problems. ``build(op_name, backend, ...)`` returns a ``Problem``: every argument of one call by
its schema name (``_ops.OPS`` gives the names, and which arguments the op writes), with random
parameters, state and per-step gradients of ragged shapes; state that a call must not read
starts as NaN, so that reading it would show.

Oracle. ``run_against_oracle`` runs the backend's op for a few steps; before each step the
oracle takes a copy of the state the op starts from, runs the same step, and every tensor the
op writes is compared (its inputs must come back untouched). The oracle is the reference
(``gerne_kernels._reference``, the specification) in the same dtype; for the reference backend
itself it is the reference computed in float64 from float64 copies, rounded only when compared,
so that no backend is held against itself.
"""

import copy
import dataclasses
import functools
import os
from typing import Callable, Optional

import pytest
import torch

from gerne_kernels import _backends, _ops, _reference
from gerne_testing import require_cpu_build

HAS_GPU = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BETAS = (-1.0, 0.0, 1.0, 3.0)
OP_NAMES = tuple(spec.name for spec in _ops.OPS)

# ---------------------------------------------------------------------------------------------
# Tolerances

# float32: a few ulps (the GPU contracts a * b + c into one fma, torch's CPU lerp is an fma).
# bfloat16/float16: float32 math rounded once per step to the storage type, where a float32
# result a few ulps off the reference's can land on the other side of a rounding tie: at most a
# few storage ulps anywhere, and one ulp for all but a small fraction of elements.
FLOAT32_TOLERANCE = dict(rtol=2e-6, atol=1e-6)
STORAGE_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
MAX_ONE_ULP_MISMATCH_FRACTION = 0.01
# scan_'s float64 sums, relative to their size (the sum of |term| for the squares, and its
# Cauchy-Schwarz bound sqrt(sum g_b^2 * sum g_lb^2) for sum g_b * g_lb): a backend may form
# each g in float32 (one rounding, 2^-24) before widening it; every sum is added in float64.
SUMS_RTOL = 1e-6


def _assert_within(a32, e32, rtol, atol, what):
    """|a - e| <= atol + rtol |e| everywhere (equal infinities, and NaN where the oracle has
    NaN, pass), a32 and e32 in float32: a few vectorised passes (torch.testing.assert_close
    takes seconds on large lists). Returns |a - e| and |e| for further checks."""
    difference, size = (a32 - e32).abs(), e32.abs()
    ok = difference <= atol + rtol * size
    if not bool(ok.all()):
        ok |= (a32 == e32) | (a32.isnan() & e32.isnan())
        if not bool(ok.all()):
            bad = (~ok).nonzero()[:, 0]
            i = int(bad[0])
            largest = difference.nan_to_num(float("inf")).max().item()
            raise AssertionError(
                f"{what}: {bad.numel()} of {a32.numel()} elements beyond atol={atol:g} + "
                f"rtol={rtol:g} |expected|; the first at flat index {i}: {a32[i].item()!r} vs "
                f"the oracle's {e32[i].item()!r}; the largest difference {largest:g}")
    return difference, size


def _close_in_storage_dtype(actual, expected, dtype, what):
    """One list of tensors of one dtype (concatenated: one comparison, not one per tensor)."""
    def flat(tensors):
        if not tensors:
            return torch.zeros(0)
        return torch.cat([t.reshape(-1) for t in tensors]).float()
    a32, e32 = flat(actual), flat(expected)
    if dtype not in STORAGE_EPS:
        _assert_within(a32, e32, what=what, **FLOAT32_TOLERANCE)
        return
    eps = STORAGE_EPS[dtype]
    difference, size = _assert_within(a32, e32, rtol=4 * eps, atol=1e-5, what=what)
    beyond_one_ulp = int((difference > eps * size + 1e-5).sum()) if a32.numel() else 0
    fraction = beyond_one_ulp / max(a32.numel(), 1)
    assert fraction <= MAX_ONE_ULP_MISMATCH_FRACTION, (
        f"{what}: {fraction:.2%} of the elements differ from the oracle by more than one "
        f"{dtype} ulp")


def assert_all_close(actual, expected, what, exempt=None):
    """actual (a list of tensors) against expected (the oracle's, rounded to actual's dtypes)
    under the tolerance of each tensor's dtype; exempt: per tensor, a mask of elements left
    out (where the oracle and the op may legitimately differ, see Problem.ties)."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, oracle {len(expected)}"
    by_dtype = {}
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)}, oracle {tuple(e.shape)}"
        e = e.to(a.dtype)
        if exempt is not None:
            a, e = a[~exempt[i]], e[~exempt[i]]
        pair = by_dtype.setdefault(a.dtype, ([], [], []))
        pair[0].append(a)
        pair[1].append(e)
        pair[2].append(i)
    for dtype, (a, e, indices) in by_dtype.items():
        try:
            _close_in_storage_dtype(a, e, dtype, f"{what} ({dtype})")
        except AssertionError:
            for i, x, y in zip(indices, a, e):  # name the first tensor that differs
                _close_in_storage_dtype([x], [y], dtype, f"{what}[{i}] ({dtype})")
            raise


def assert_sums_close(actual, expected, what="sums"):
    """scan_'s four float64 sums within SUMS_RTOL of their size."""
    e = expected.double()
    size = torch.stack([e[0].abs(), e[1].abs(), e[2].abs(), (e[1] * e[2]).abs().sqrt()])
    error = (actual.double() - e).abs()
    assert bool((error <= SUMS_RTOL * size + 1e-300).all()), (
        f"{what}: {actual.tolist()}, oracle {e.tolist()} (allowed error {SUMS_RTOL} x "
        f"{size.tolist()})")


_SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def same_bits(a, e):
    """a and e hold the same bits (NaN payloads included), dtype and shape."""
    if a.dtype != e.dtype or a.shape != e.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, e)
    as_int = _SAME_WIDTH_INT[a.element_size()]
    return torch.equal(a.reshape(-1).view(as_int), e.reshape(-1).view(as_int))


def assert_bitwise_equal(actual, expected, what):
    """Bit for bit, NaN included (lists of tensors, or single tensors or None)."""
    if not isinstance(actual, list):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            assert a is e, f"{what}[{i}]: {a!r} vs {e!r}"
            continue
        assert same_bits(a, e), f"{what}[{i}] differs: {a.flatten()[:8]} vs {e.flatten()[:8]}"


# ---------------------------------------------------------------------------------------------
# Backends


@dataclasses.dataclass(frozen=True)
class SizeProfile:
    """The tensor sizes a backend's tests use.

    shapes: ragged shapes for the op-vs-oracle tests: empty, one element, sizes that leave a
        tail after the SIMD blocks or vectors, a 2-D one, tensors of several blocks.
    block: elements per program / chunk of the backend's kernels (tests straddle it).
    large, small: the numel of one large tensor, and of the many small ones beside it.
    many: numels of more tensors than one CUDA launch's table holds (None: not run here).
    thorough: every dtype x hyperparameters x beta combination, else the quick subset.
    steps: steps per op-vs-oracle test: the state of one step feeds the next (two suffice:
        the oracle restarts from the op's state at every step, so a third runs the second's
        code again).
    """
    shapes: tuple
    block: int
    large: int
    small: tuple
    many: Optional[tuple]
    thorough: bool
    steps: int = 2

    @property
    def spanning_blocks(self):
        """Sizes just before, on and just after a block boundary, and several blocks."""
        b = self.block
        return ((b - 1,), (b,), (b + 1,), (3 * b + 7,))


# Odd sizes leave a scalar tail after the 16- or 32-element SIMD blocks of the CPU kernels;
# 40000 elements make the parallel path (two threads); 1025 is just over a power of two.
HOST_SIZES = SizeProfile(
    shapes=((0,), (1,), (15,), (17,), (3, 11), (2, 0, 3), (1025,), (40000,)),
    block=1 << 16, large=(1 << 20) + 3, small=tuple(i % 40 for i in range(300)), many=None,
    thorough=True)
# Program counts, not bytes, set the interpreter's time (~10 ms a program): five programs of
# its 1024-element blocks per call (1100 elements span two).
INTERPRETER_SIZES = SizeProfile(
    shapes=((5,), (0,), (1,), (1100,), (3, 11)),
    block=1024, large=2 * 1024 + 5, small=tuple(i % 5 for i in range(12)), many=None,
    thorough=False)
# Empty, tiny, not a multiple of the 4- or 8-element vectors, exactly one 64 Ki chunk, one
# element past it, several chunks with a ragged end; the tables of one CUDA launch hold ~460
# (Adam) to ~1460 (the scan) tensors: 1600 exceed each.
GPU_SIZES = SizeProfile(
    shapes=((0,), (1,), (3,), (4,), (7,), (15,), (17,), (1025,), (4096,), (65536,), (65537,),
            (200003,), (1 << 18,), (1_000_003,), (3, 11)),
    block=1 << 16, large=(1 << 24) + 3, small=tuple(i % 40 for i in range(1000)),
    many=tuple((i * 37) % 101 for i in range(1600)), thorough=True)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend of gerne_kernels._backends, as the op tests run it.

    name: the backend's name (``GERNE(backend=name)``); device: its tensors' device type;
    sizes: its SizeProfile.
    """
    name: str
    device: str
    sizes: SizeProfile

    @property
    def id(self):
        return "triton-interpreter" if self.interpreted else self.name

    @property
    def interpreted(self):
        return self.name == "triton" and self.device == "cpu"

    @property
    def fused(self):
        """A registered torch.library op (not the Python reference)."""
        return self.name != "reference"

    @property
    def cpp(self):
        """The C++ ops (cpu, cuda): one error vocabulary, RuntimeError."""
        return self.name in ("cpu", "cuda")

    def require(self):
        """Returns if this backend runs here; else skips the calling test with the reason, or
        fails it where the backend must run: cpu under GERNE_KERNELS_REQUIRE_CPU=1 (as in CI),
        cuda on a machine with a GPU, triton wherever triton imports (a kernel module that does
        not import is a bug, not a missing dependency)."""
        if self.name == "reference":
            return
        ok, reason, _ = _backends.status(self.name)  # built (or found) once per process
        if ok:
            return
        if self.name == "cpu":
            require_cpu_build()  # skips, or fails under GERNE_KERNELS_REQUIRE_CPU=1
        message = f"the {self.id} backend is unavailable: {reason}"
        if ((self.name == "cuda" and HAS_GPU)
                or (self.name == "triton" and "failed to import" in reason)
                or self.name == "cpu"):
            pytest.fail(message)
        pytest.skip(message)

    def implementation(self, tensor_scalars=False):
        return _backends.implementation(self.name, self.device, torch.float32, tensor_scalars)

    def op(self, name, tensor_scalars=False):
        """The op ``name`` of this backend; tensor_scalars: its .tensor overload."""
        return self.implementation(tensor_scalars).op(name)


# The reference is the specification, held against its float64 self: the quick grid, and no
# kernel blocks or threads to reach (the host's shapes without the large one).
REFERENCE_SIZES = dataclasses.replace(
    HOST_SIZES, shapes=HOST_SIZES.shapes[:-1] + ((4099,),), block=4096, large=(1 << 14) + 3,
    small=HOST_SIZES.small[:100], thorough=False)

BACKENDS = (
    Backend("reference", "cpu", REFERENCE_SIZES),
    Backend("cpu", "cpu", HOST_SIZES),
    Backend("cuda", "cuda", GPU_SIZES),
    Backend("triton", "cpu", INTERPRETER_SIZES) if INTERPRETER or not HAS_GPU
    else Backend("triton", "cuda", dataclasses.replace(GPU_SIZES, block=2048)),
)
BY_NAME = {backend.name: backend for backend in BACKENDS}


def backend_params(names=None):
    """pytest.param per backend (all, or those named), for the ``backend`` fixture."""
    return [pytest.param(b, id=b.id) for b in BACKENDS if names is None or b.name in names]


def over_backends(names=None):
    """Parametrizes the ``backend`` fixture over the named backends only."""
    return pytest.mark.parametrize("backend", backend_params(names), indirect=True)


def on_gpu(names=("cuda", "triton")):
    """Parametrizes ``backend`` over the GPU backends, each skipped without a GPU."""
    params = [pytest.param(b, id=b.id, marks=() if b.device == "cuda" else pytest.mark.skip(
        reason=f"needs a CUDA device: the {b.name} backend runs in the interpreter here"))
        for b in BACKENDS if b.name in names]
    return pytest.mark.parametrize("backend", params, indirect=True)


# ---------------------------------------------------------------------------------------------
# Hyperparameters and the dtype x hyperparameters x beta grid

SGD_HYPERS = (
    dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.01,
         maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.02, maximize=False),
    dict(lr=0.05, momentum=0.5, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True),
    dict(lr=0.2, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=True),
    dict(lr=0.05, momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True),
)
ADAM_HYPERS = (
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
         maximize=False, decoupled_weight_decay=False),
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
         maximize=False, decoupled_weight_decay=True),
    dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, amsgrad=True,
         maximize=True, decoupled_weight_decay=True),
    dict(lr=1e-2, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.0, amsgrad=True,
         maximize=False, decoupled_weight_decay=False),  # beta1 < 0.5: lerp's other branch
    dict(lr=3e-2, beta1=0.0, beta2=0.5, eps=1e-3, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=True,
         maximize=True, decoupled_weight_decay=False),
)
LION_HYPERS = (
    dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
    dict(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False),
    dict(lr=1e-2, beta1=0.95, beta2=0.98, weight_decay=0.01, maximize=True),
    dict(lr=5e-2, beta1=0.0, beta2=0.5, weight_decay=0.0, maximize=False),  # c = g
    dict(lr=2e-2, beta1=0.3, beta2=0.9, weight_decay=0.05, maximize=True),
)
# build() options that vary each op's call: its hyperparameter sets, extrapolate_'s output
# (separate, or over grads_lb), scan_'s sums (given, added to, absent) and grads_lb (empty).
VARIANTS = {
    "sgd_step_": [dict(hyper=h) for h in SGD_HYPERS],
    "adam_step_": [dict(hyper=h) for h in ADAM_HYPERS],
    "lion_step_": [dict(hyper=h) for h in LION_HYPERS],
    "extrapolate_": [dict(alias_out=False), dict(alias_out=True)],
    "scan_": [dict(), dict(sums=None), dict(empty_grads_lb=True),
              dict(empty_grads_lb=True, sums=None), dict(sums=(1.5, 2.0, 3.0, -4.0))],
}
# The op's hyperparameters where one set is enough: the richest (momentum, nesterov and weight
# decay; amsgrad, maximize and decoupled weight decay).
DEFAULT_HYPERS = {"sgd_step_": SGD_HYPERS[3], "adam_step_": ADAM_HYPERS[3],
                  "lion_step_": LION_HYPERS[2], "extrapolate_": {}, "scan_": {}}


@dataclasses.dataclass(frozen=True)
class Case:
    """One point of a dtype x variant x beta grid (a variant: build() options, e.g. one
    hyperparameter set); quick: in the subset that the interpreter and the reference run."""
    dtype: torch.dtype
    label: str
    options: dict
    beta: float
    quick: bool

    @property
    def id(self):
        return f"{str(self.dtype)[6:]}-{self.label}-beta{self.beta:g}"


def grid(variants, quick, labels=None):
    """Every dtype x variant x beta. The quick subset: every variant in float32, those whose
    indices ``quick`` lists in bfloat16 and float16 too (storage rounding does not depend on
    the hyperparameters), at beta = 1; every beta on the first of them in float32."""
    labels = labels or [f"variant{i}" for i in range(len(variants))]
    cases = []
    for dtype in DTYPES:
        for index, (label, options) in enumerate(zip(labels, variants)):
            for beta in BETAS:
                is_quick = (beta == 1.0 and (dtype == torch.float32 or index in quick)
                            or (dtype == torch.float32 and index == quick[0]))
                cases.append(Case(dtype, label, options, beta, is_quick))
    return cases


def hyper_grid(op_name, quick):
    """grid over an update op's hyperparameter sets (VARIANTS), labelled hyper0, hyper1, ..."""
    variants = VARIANTS[op_name]
    return grid(variants, quick, labels=[f"hyper{i}" for i in range(len(variants))])


def over_cases(cases):
    """Parametrizes (backend, case): every case on a thorough backend, the quick ones on the
    others."""
    params = [pytest.param(b, c, id=f"{b.id}-{c.id}") for b in BACKENDS for c in cases
              if b.sizes.thorough or c.quick]
    return pytest.mark.parametrize(("backend", "case"), params, indirect=["backend"])


# ---------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass(frozen=True)
class Signature:
    """An op's arguments as its schema (from _ops.OPS) lists them."""
    positional: tuple
    keywords: tuple
    written: frozenset

    @property
    def skips_on_found_inf(self):
        """The update ops only read found_inf (non-zero: they change nothing); scan_ sets it."""
        return "found_inf" not in self.written


@functools.lru_cache(maxsize=None)
def signature(op_name):
    schema = _ops.op(op_name)._schema
    return Signature(
        positional=tuple(a.name for a in schema.arguments if not a.kwarg_only),
        keywords=tuple(a.name for a in schema.arguments if a.kwarg_only),
        written=frozenset(a.name for a in schema.arguments
                          if a.alias_info is not None and a.alias_info.is_write))


UPDATE_OPS = tuple(name for name in OP_NAMES if signature(name).skips_on_found_inf)
FLAGGING_OPS = tuple(name for name in OP_NAMES if not signature(name).skips_on_found_inf)


@dataclasses.dataclass(frozen=True)
class Gradients:
    """One step's gradients of both batches, each multiplied by its batch's loss scale."""
    grads_b: list
    grads_lb: list


@dataclasses.dataclass
class Problem:
    """One op's call, step after step.

    tensors: the positional arguments by schema name (tensor lists, found_inf, scan_'s sums);
        grads_b and grads_lb are those of the current step (``use_step``).
    scalars: the keyword-only arguments; first_step_scalars: overrides on step 0
        (is_first_step for SGD with momentum).
    gradients: one Gradients per step.
    out_is_grads_lb: extrapolate_ writes over its own grads_lb.
    ties: (problem before a step) -> {argument: [mask per tensor]} of the elements where the
        oracle and the op may legitimately differ (Lion's sign(c) at c within rounding of 0).
    """
    op_name: str
    tensors: dict
    scalars: dict
    gradients: list = dataclasses.field(default_factory=list)
    first_step_scalars: dict = dataclasses.field(default_factory=dict)
    out_is_grads_lb: bool = False
    ties: Optional[Callable] = None

    @property
    def signature(self):
        return signature(self.op_name)

    def use_step(self, step):
        """Installs fresh copies of step ``step``'s gradients."""
        grads = self.gradients[step]
        self.tensors["grads_b"] = [copy_in_place_layout(g) for g in grads.grads_b]
        self.tensors["grads_lb"] = [copy_in_place_layout(g) for g in grads.grads_lb]
        if self.out_is_grads_lb:
            self.tensors["out"] = self.tensors["grads_lb"]
        return self

    def arguments(self, step=None, **overrides):
        """(positional arguments, keyword arguments) of one call at ``step``."""
        scalars = dict(self.scalars, **(self.first_step_scalars if step == 0 else {}))
        scalars.update(overrides)
        return [self.tensors[name] for name in self.signature.positional], scalars

    def call(self, op, step=None, **overrides):
        """One call of op (a backend's op or a reference function) on these tensors."""
        args, kwargs = self.arguments(step, **overrides)
        op(*args, **kwargs)

    def written(self):
        """{name: value} of the arguments the op writes."""
        return {name: self.tensors[name] for name in self.signature.written}

    def copy(self):
        """The tensors copied (in one deepcopy: out stays grads_lb where it aliases it); the
        gradients of later steps shared (use_step copies them)."""
        return dataclasses.replace(self, tensors=copy.deepcopy(self.tensors),
                                   scalars=copy.deepcopy(self.scalars))

    def inputs_copy(self):
        """A copy of the arguments the op only reads (what compare_step checks are left as
        they were); the written ones are left out (None)."""
        written = self.signature.written
        return dataclasses.replace(self, tensors={
            name: None if name in written else copy.deepcopy(value)
            for name, value in self.tensors.items()})

    def in_float64(self):
        """A copy whose floating tensors (but found_inf) are float64: the reference backend's
        oracle."""
        converted = {}  # id -> copy: keeps out aliasing grads_lb

        def up(t):
            if id(t) not in converted:
                converted[id(t)] = (t.to(torch.float64, copy=True) if t.is_floating_point()
                                    else t.clone())  # a copy even of a float64 tensor
            return converted[id(t)]

        tensors = {}
        for name, value in self.tensors.items():
            if isinstance(value, list):
                tensors[name] = [up(t) for t in value]
            elif value is None or name == "found_inf":
                tensors[name] = None if value is None else value.clone()
            else:
                tensors[name] = up(value)
        return dataclasses.replace(self, tensors=tensors, scalars=copy.deepcopy(self.scalars))

    def all_tensors(self):
        out = []
        for value in self.tensors.values():
            out.extend(value if isinstance(value, list) else [value])
        return out


def random_tensors(shapes, dtype, device, generator, kind="normal", scale=1.0):
    out = []
    for shape in shapes:
        t = (torch.randn(shape, generator=generator) if kind == "normal"
             else torch.rand(shape, generator=generator))
        out.append((t * scale).to(device=device, dtype=dtype))
    return out


def offset_copy(t, offset):
    """A contiguous copy of t whose data starts ``offset`` elements into its storage (not
    16-byte aligned for offset 1..3)."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def copy_in_place_layout(t):
    """A copy of t at t's offset into a storage of its own (a misaligned view stays one)."""
    return offset_copy(t, t.storage_offset())


def nan_like(tensors):
    return [torch.full_like(t, float("nan")) for t in tensors]


def scales(beta, inv_scale_b=1.0, inv_scale_lb=1.0):
    """(scale_b, scale_lb) as the optimizer forms them from beta and the inverse loss scales."""
    return -beta * inv_scale_b, (1.0 + beta) * inv_scale_lb


def draw_gradients(shapes, dtype, device, generator, steps, inv_scales):
    return [Gradients(random_tensors(shapes, dtype, device, generator, scale=1.0 / inv_scales[0]),
                      random_tensors(shapes, dtype, device, generator, scale=1.0 / inv_scales[1]))
            for _ in range(steps)]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every problem builder gets: where, which dtype and shapes, a seeded generator."""
    device: str
    dtype: torch.dtype
    shapes: tuple
    generator: torch.Generator

    def tensors(self, kind="normal", scale=1.0):
        return random_tensors(self.shapes, self.dtype, self.device, self.generator, kind, scale)

    def zero_flag(self):
        return torch.zeros((), dtype=torch.float32, device=self.device)


def sgd_problem(setup, hyper, options):
    """Parameters, and momentum buffers: NaN, as the first step writes them without reading,
    or (options["mid_training"]) random, every step reading them."""
    params = setup.tensors()
    has_momentum = hyper["momentum"] != 0
    fresh = has_momentum and not options.get("mid_training")
    buffers = nan_like(params) if fresh else setup.tensors(scale=0.1) if has_momentum else []
    return Problem("sgd_step_", dict(params=params, momentum_buffers=buffers,
                                     found_inf=setup.zero_flag()),
                   dict(hyper, is_first_step=False),
                   first_step_scalars={"is_first_step": True} if fresh else {})


def adam_problem(setup, hyper, options):
    """Mid-training moments and step counts that differ per tensor (options["first_steps"],
    cycled; options["step_dtype"] their dtype)."""
    first_steps = options.get("first_steps", (0, 3, 1, 40))
    exp_avg_sqs = setup.tensors("uniform", 0.01)
    if hyper["amsgrad"]:
        max_exp_avg_sqs = [v + e for v, e in zip(exp_avg_sqs, setup.tensors("uniform", 0.01))]
    else:
        max_exp_avg_sqs = []
    steps = [torch.tensor(float(first_steps[i % len(first_steps)]),
                          dtype=options.get("step_dtype", torch.float32), device=setup.device)
             for i in range(len(setup.shapes))]
    return Problem("adam_step_", dict(params=setup.tensors(), exp_avgs=setup.tensors(scale=0.1),
                                      exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
                                      state_steps=steps, found_inf=setup.zero_flag()),
                   dict(hyper))


def lion_sign_ties(problem):
    """The parameters' elements whose c = beta1 m + (1 - beta1) g lies within float32
    rounding of 0 (relative to the size of its terms): there sign(c) may differ between two
    correct float32 computations, and with it the update by 2 lr. An exact 0 is no tie."""
    s = problem.scalars
    scale_b, scale_lb, beta1 = float(s["scale_b"]), float(s["scale_lb"]), s["beta1"]
    masks = []
    for m, g_b, g_lb in zip(problem.tensors["exp_avgs"], problem.tensors["grads_b"],
                            problem.tensors["grads_lb"]):
        m, g_b, g_lb = m.double(), g_b.double(), g_lb.double()
        g = scale_lb * g_lb + scale_b * g_b
        c = beta1 * m + (1 - beta1) * (-g if s["maximize"] else g)
        size = (beta1 * m.abs()
                + (1 - beta1) * (abs(scale_lb) * g_lb.abs() + abs(scale_b) * g_b.abs()))
        masks.append(c.abs() < 1e-6 * size)
    return {"params": masks}


def lion_problem(setup, hyper, options):
    """Parameters and mid-training momentum."""
    return Problem("lion_step_", dict(params=setup.tensors(), exp_avgs=setup.tensors(scale=0.1),
                                      found_inf=setup.zero_flag()),
                   dict(hyper), ties=lion_sign_ties)


def extrapolate_problem(setup, hyper, options):
    """out (NaN: written, never read), or out = grads_lb itself (options["alias_out"])."""
    alias = options.get("alias_out", False)
    return Problem("extrapolate_", dict(out=None if alias else nan_like(setup.tensors()),
                                        found_inf=setup.zero_flag()), {},
                   out_is_grads_lb=alias)


def scan_problem(setup, hyper, options):
    """found_inf 0 and sums (options["sums"]: None, or the values they start from)."""
    sums = options.get("sums", (0.0, 0.0, 0.0, 0.0))
    return Problem("scan_", dict(found_inf=setup.zero_flag(), sums=None if sums is None else
                                 torch.tensor(sums, dtype=torch.float64, device=setup.device)),
                   {})


BUILDERS = {"sgd_step_": sgd_problem, "adam_step_": adam_problem, "lion_step_": lion_problem,
            "extrapolate_": extrapolate_problem, "scan_": scan_problem}


def build(op_name, device, dtype=torch.float32, shapes=((5,), (3, 2), (0,), (33,)), *,
          hyper=None, beta=1.0, inv_scales=(1.0, 1.0), steps=1, seed=0, **options):
    """A Problem for op_name on device (a device type, or a Backend: its device), at step 0.

    hyper: the op's hyperparameters (DEFAULT_HYPERS[op_name] if None); beta and inv_scales
    set scale_b and scale_lb; steps: how many steps of gradients to draw; options: the op's
    builder's (mid_training; first_steps, step_dtype; alias_out; sums, empty_grads_lb)."""
    device = getattr(device, "device", device)
    setup = Setup(device, dtype, tuple(shapes), torch.Generator().manual_seed(seed))
    hyper = DEFAULT_HYPERS[op_name] if hyper is None else hyper
    problem = BUILDERS[op_name](setup, hyper, options)
    scale_b, scale_lb = scales(beta, *inv_scales)
    problem.scalars.update(scale_b=scale_b, scale_lb=scale_lb)
    problem.gradients = draw_gradients(setup.shapes, dtype, device, setup.generator, steps,
                                       inv_scales)
    if options.get("empty_grads_lb"):  # scan_ of g_b alone
        problem.gradients = [Gradients(g.grads_b, []) for g in problem.gradients]
    return problem.use_step(0)


# ---------------------------------------------------------------------------------------------
# The oracle


def oracle_problem(backend, problem):
    """The oracle's copy of a problem: the same dtype for a fused backend, float64 for the
    reference backend."""
    return problem.in_float64() if backend.name == "reference" else problem.copy()


def reference_op(op_name):
    return getattr(_reference, op_name)


def compare_step(actual, expected, before, what="", ties=None):
    """After one step: every written tensor against the oracle's, the inputs untouched.

    before: the problem before the step (at least its inputs: inputs_copy); ties: the
    problem's ties (default: computed from before)."""
    sig = actual.signature
    if ties is None:
        ties = actual.ties(before) if actual.ties else {}
    written_ids = {id(t) for name in sig.written for t in as_list(actual.tensors[name])}
    for name in sig.positional:
        a, e = actual.tensors[name], expected.tensors[name]
        label = f"{what}{actual.op_name} {name}"
        if name not in sig.written:
            if isinstance(a, list) and not any(id(t) in written_ids for t in a):
                assert_bitwise_equal(a, before.tensors[name], f"{label} (an input)")
            continue
        if name == "found_inf":
            assert float(a) == float(e), f"{label}: {float(a)}, oracle {float(e)}"
        elif name == "sums":
            if a is not None and float(expected.tensors["found_inf"]) == 0:
                assert_sums_close(a, e, label)
        elif name == "state_steps":
            assert [float(s) for s in a] == [float(s) for s in e], label
        else:
            assert_all_close(a, e, label, exempt=ties.get(name))
    if "found_inf" not in sig.written:
        assert float(actual.tensors["found_inf"]) == float(before.tensors["found_inf"]), \
            f"{what}{actual.op_name} wrote found_inf, which it may only read"


def as_list(value):
    return value if isinstance(value, list) else [value]


def assert_something_written(after, before):
    """Some element of what the op writes differs from before: the calls did something (a
    comparison of two runs that did nothing would prove nothing)."""
    assert any(not same_bits(a, b) for name, value in after.written().items()
               for a, b in zip(as_list(value), as_list(before.tensors[name]))
               if a is not None and a.numel()), f"{after.op_name}: the calls changed nothing"


def run_against_oracle(backend, problem, steps=None, tensor_scalars=False):
    """Runs ``steps`` steps (default: all the problem's gradients) of the backend's op; before
    each, the oracle copies the op's state, runs the same step, and compare_step checks it.
    Returns the problem after the last step."""
    op = backend.op(problem.op_name, tensor_scalars)
    reference = reference_op(problem.op_name)
    for step in range(len(problem.gradients) if steps is None else steps):
        problem.use_step(step)
        ties = problem.ties(problem) if problem.ties else {}
        before = problem.inputs_copy()
        expected = oracle_problem(backend, problem)
        problem.call(op, step)
        expected.call(reference, step)
        compare_step(problem, expected, before, what=f"step {step}: ", ties=ties)
    return problem


def check_op(backend, op_name, dtype=torch.float32, shapes=None, **kwargs):
    """build + run_against_oracle over the backend's profile's steps (shapes: the profile's
    ragged shapes unless given)."""
    shapes = backend.sizes.shapes if shapes is None else shapes
    kwargs.setdefault("steps", backend.sizes.steps)
    return run_against_oracle(backend, build(op_name, backend, dtype, shapes, **kwargs))


# ---------------------------------------------------------------------------------------------
# Layouts every op is checked on (LayoutChecks: one test each in every op's file)


MISALIGNED_OFFSETS = (1, 0, 3, 2)


def misaligned(problem):
    """The problem with its per-element tensors moved 0..3 elements off a 16-byte boundary
    (per tensor, cycling MISALIGNED_OFFSETS: aligned and misaligned ones in one call)."""
    def move(tensors):
        return [offset_copy(t, MISALIGNED_OFFSETS[i % len(MISALIGNED_OFFSETS)])
                for i, t in enumerate(tensors)]
    for name, value in problem.tensors.items():
        if isinstance(value, list) and name not in ("state_steps", "grads_b", "grads_lb"):
            problem.tensors[name] = move(value)
    problem.gradients = [Gradients(move(g.grads_b), move(g.grads_lb))
                         for g in problem.gradients]
    return problem.use_step(0)


def check_misaligned(backend, op_name, dtype, **kwargs):
    """One step on tensors 0..3 elements off a 16-byte boundary, aligned and not in one call."""
    sizes = (65537, 1000, 70001, 33) if backend.sizes.thorough else (1025, 100, 2500, 33)
    problem = build(op_name, backend, dtype, [(n,) for n in sizes], **dict(kwargs, steps=1))
    run_against_oracle(backend, misaligned(problem))


def require_many(backend):
    """The profile's ``many`` (more tensors than one CUDA launch holds), or a skip."""
    if backend.sizes.many is None:
        pytest.skip(f"{backend.id}: no launch table to overflow here (that is the GPU "
                    "backends' limit); the large-and-many-small test covers many tensors")
    return tuple((n,) for n in backend.sizes.many)


class LayoutChecks:
    """The tensor layouts every op is checked on, against the oracle, on every backend: an op's
    test file collects them with ``class TestLayouts(harness.LayoutChecks): OP = "<name>"``.

    OP: the op; OPTIONS: build() options for all of them (hyperparameters, steps);
    BLOCKS_DTYPE: the dtype of the block-boundary test."""
    OP = None
    OPTIONS = {}
    BLOCKS_DTYPE = torch.float32

    def check(self, backend, dtype=torch.float32, **options):
        return check_op(backend, self.OP, dtype, **dict(self.OPTIONS, **options))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_inverse_loss_scales(self, backend, dtype):
        """AMP: each batch's gradient arrives multiplied by its own loss scale; the op divides
        it back out through scale_b and scale_lb."""
        self.check(backend, dtype, beta=1.0, inv_scales=(1 / 1024, 1 / 256))

    def test_one_large_tensor_and_many_small_ones(self, backend):
        """Several chunks of one tensor and many tensors in one call (thread groups, tables)."""
        shapes = ((backend.sizes.large,),) + tuple((n,) for n in backend.sizes.small)
        self.check(backend, shapes=shapes, beta=3.0)

    def test_tensors_spanning_several_blocks(self, backend):
        """Tensors ending just before, on and just after a block (chunk) boundary, and one of
        several blocks."""
        self.check(backend, self.BLOCKS_DTYPE, shapes=backend.sizes.spanning_blocks)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_misaligned_views(self, backend, dtype):
        check_misaligned(backend, self.OP, dtype, **dict(self.OPTIONS, beta=2.0))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_more_tensors_than_one_launch_holds(self, backend, dtype):
        self.check(backend, dtype, shapes=require_many(backend), beta=3.0)


def assert_unchanged(after, before, names=None):
    """The problem's tensors (all, or those named) bit for bit as before."""
    for name in after.tensors if names is None else names:
        assert_bitwise_equal(after.tensors[name], before.tensors[name],
                             f"{after.op_name} {name}")


def require_fused(backend, why):
    if not backend.fused:
        pytest.skip(f"the reference backend is plain Python: {why}")

