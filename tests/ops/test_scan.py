"""scan_ on every backend: found_inf set to 1 when any element of g_b or g_lb is inf or NaN
(never cleared), and, when sums is given, [sum g^2, sum g_b^2, sum g_lb^2, sum g_b * g_lb]
added into it (float64), g = scale_lb * g_lb + scale_b * g_b; an empty grads_lb scans g_b
alone. Against the oracle (harness.run_against_oracle: the reference, or for the reference
backend the reference in float64) and against the sums written here in float64."""

import math

import pytest
import torch

import harness

OP = "scan_"
NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
LABELS = ["sums", "no_sums", "empty_grads_lb", "empty_grads_lb-no_sums", "sums_added_to"]


@harness.over_cases(harness.grid(harness.VARIANTS[OP], quick=(0, 2), labels=LABELS))
def test_scan_matches_the_oracle(backend, case):
    """Finite gradients: found_inf stays 0; the sums (over two calls: they accumulate)."""
    harness.check_op(backend, OP, case.dtype, beta=case.beta, steps=2, **case.options)


def sums_in_float64(problem):
    """The four sums of problem's gradients, formed here in float64."""
    scale_b, scale_lb = (float(problem.scalars[k]) for k in ("scale_b", "scale_lb"))
    total = torch.zeros(4, dtype=torch.float64)
    grads_lb = problem.tensors["grads_lb"] or [torch.zeros_like(g)
                                               for g in problem.tensors["grads_b"]]
    for g_b, g_lb in zip(problem.tensors["grads_b"], grads_lb):
        b, lb = g_b.double().cpu().reshape(-1), g_lb.double().cpu().reshape(-1)
        g = scale_lb * lb + scale_b * b
        total += torch.stack([(g * g).sum(), (b * b).sum(), (lb * lb).sum(), (b * lb).sum()])
    return total


def check_sums(backend, problem):
    """One scan_ call: found_inf stays 0, the sums are sums_in_float64 (added to the start)."""
    start = problem.tensors["sums"].clone()
    problem.call(backend.op(OP))
    assert float(problem.tensors["found_inf"]) == 0.0
    harness.assert_sums_close(problem.tensors["sums"].cpu() - start.cpu(),
                              sums_in_float64(problem))


@pytest.mark.parametrize("empty_grads_lb", [False, True], ids=["both", "empty_grads_lb"])
@pytest.mark.parametrize("dtype", harness.DTYPES, ids=str)
def test_sums_are_the_float64_sums(backend, dtype, empty_grads_lb):
    problem = harness.build(OP, backend, dtype, backend.sizes.shapes, beta=3.0,
                            inv_scales=(0.5, 0.25), empty_grads_lb=empty_grads_lb,
                            sums=(1.0, -2.0, 0.5, 7.0))
    check_sums(backend, problem)


@pytest.mark.parametrize("dtype", harness.DTYPES, ids=str)
def test_the_largest_finite_gradients_are_not_flagged(backend, dtype):
    """inf and NaN only: dtype's largest finite value, its negative, -0.0 and the smallest
    subnormal pass; their squares are summed in float64 without overflow."""
    finfo = torch.finfo(dtype)
    device = backend.device
    values = torch.tensor([finfo.max, -finfo.max, -0.0, finfo.smallest_normal / 4, 1.0])
    g_b = [values.repeat(7).to(dtype).to(device), torch.full((5,), -0.0, dtype=dtype,
                                                             device=device)]
    g_lb = [values.flip(0).repeat(7).to(dtype).to(device), torch.zeros(5, dtype=dtype,
                                                                       device=device)]
    problem = harness.build(OP, backend, dtype, [(35,), (5,)])
    problem.tensors.update(grads_b=g_b, grads_lb=g_lb)
    problem.scalars.update(scale_b=1.0, scale_lb=1.0)
    check_sums(backend, problem)


def nonfinite_places(backend):
    """(tensor index, element index) of the places a non-finite value is put: the first and
    the last element of every non-empty tensor of the profile's shapes (the last sits in the
    scalar tail of sizes that are no multiple of a vector), and the first of the second block
    of tensors spanning blocks; the interpreter: the largest tensor's and the last one's."""
    numels = [math.prod(shape) for shape in backend.sizes.shapes]
    candidates = [i for i, n in enumerate(numels) if n]
    if not backend.sizes.thorough:
        candidates = sorted({max(candidates, key=numels.__getitem__), candidates[-1]})
    places = []
    for i in candidates:
        elements = {0, numels[i] - 1}
        if numels[i] > backend.sizes.block:
            elements.add(backend.sizes.block)
        places += [(i, e) for e in sorted(elements)]
    return places


def check_flagged(backend, problem, which, place, value, against_oracle=True):
    """``value`` put at ``place`` of list ``which`` (and taken out again after the call):
    found_inf becomes exactly 1 (as the oracle's does, where against_oracle), and the op
    wrote none of the gradients."""
    tensor, element = place
    target = problem.tensors[which][tensor].view(-1)
    original = target[element].clone()
    target[element] = value
    problem.tensors["found_inf"].zero_()
    if against_oracle:
        expected = harness.oracle_problem(backend, problem)
        expected.call(harness.reference_op(OP))
        assert float(expected.tensors["found_inf"]) == 1.0
    problem.call(backend.op(OP))
    assert float(problem.tensors["found_inf"]) == 1.0, f"{value} in {which}{list(place)}"
    target[element] = original
    for name in ("grads_b", "grads_lb"):
        harness.assert_bitwise_equal(problem.tensors[name],
                                     getattr(problem.gradients[0], name), name)


def flag_cases():
    """Every backend x list x value x dtype x (with sums, without): the two scans the C++
    ops run. The interpreter: bfloat16 only."""
    lists = ["grads_b", "grads_lb", "grads_b-alone"]
    return [pytest.param(b, which, value, dtype, sums, id=f"{b.id}-{which}-{value}-"
                         f"{str(dtype)[6:]}-{'sums' if sums else 'no_sums'}")
            for b in harness.BACKENDS for which in lists for value in NONFINITE
            for dtype in harness.DTYPES for sums in (True, False)
            if b.sizes.thorough or dtype == torch.bfloat16]


@pytest.mark.parametrize("backend,which,value,dtype,with_sums", flag_cases(),
                         indirect=["backend"])
def test_a_nonfinite_gradient_anywhere_is_flagged(backend, which, value, dtype, with_sums):
    """inf, -inf or NaN in every place of nonfinite_places, in g_b or g_lb (or in g_b with
    grads_lb empty)."""
    alone = which == "grads_b-alone"
    problem = harness.build(OP, backend, dtype, backend.sizes.shapes, beta=3.0,
                            empty_grads_lb=alone, **({} if with_sums else {"sums": None}))
    for i, place in enumerate(nonfinite_places(backend)):
        check_flagged(backend, problem, "grads_b" if alone else which, place, NONFINITE[value],
                      against_oracle=i == 0)


def test_a_nonfinite_gradient_in_any_of_many_tensors_is_flagged(backend):
    """A NaN in the first, a middle or the last of more tensors than one launch holds
    (several scan launches, their flags combined)."""
    shapes = [(max(n, 1),) for (n,) in harness.require_many(backend)]
    problem = harness.build(OP, backend, torch.float32, shapes)
    for tensor in (0, len(shapes) // 2, len(shapes) - 1):
        check_flagged(backend, problem, "grads_lb", (tensor, -1), float("nan"))


@pytest.mark.parametrize("with_nan", [False, True], ids=["finite", "nan"])
def test_found_inf_is_never_cleared(backend, with_nan):
    """found_inf = 2.5 on entry: finite gradients leave it 2.5, a NaN makes it 1 (as the
    oracle's); never 0."""
    problem = harness.build(OP, backend, torch.float32, backend.sizes.shapes)
    problem.tensors["found_inf"].fill_(2.5)
    if with_nan:
        problem.tensors["grads_b"][-1].view(-1)[0] = float("nan")
    expected = harness.oracle_problem(backend, problem)
    problem.call(backend.op(OP))
    expected.call(harness.reference_op(OP))
    assert float(problem.tensors["found_inf"]) == (1.0 if with_nan else 2.5)
    assert float(expected.tensors["found_inf"]) == float(problem.tensors["found_inf"])


class TestLayouts(harness.LayoutChecks):
    OP = OP
    OPTIONS = dict(steps=1)
    BLOCKS_DTYPE = torch.bfloat16
