"""lion_step_ and scan_ of the CPU build against gerne_kernels._reference, and the edge cases of
every op (found_inf set, empty lists, empty tensors, aliasing, inf/NaN in each position).

    python3 benchmarks/tools/check_new_ops.py

lion_step_: float32 within a few ulps of the reference, bfloat16/float16 within one storage ulp;
scan_: flags exact, sums within 1e-5 relative; .default and .tensor (float64 scalars) bit for bit
equal. Prints one line per check and exits non-zero on the first failure.
"""

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from gerne_kernels import _build, _ops, _reference  # noqa: E402  (this tree's, not an installed one)

SHAPES = [(1,), (7,), (33,), (100, 3), (4097,), (65541,), (3, 70001)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LION = [dict(beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
        dict(beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=False),
        dict(beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=True)]
SCALARS = dict(lr=1e-3, scale_b=-0.7, scale_lb=1.7)
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulps(a, b):
    """Largest distance in units in the last place between two tensors of one dtype."""
    if a.numel() == 0:
        return 0
    ia, ib = a.view(INT_VIEW[a.dtype]).long(), b.view(INT_VIEW[b.dtype]).long()
    # map the sign-magnitude bit patterns onto a line on which neighbours differ by one
    bits = ia.new_tensor(8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia & ((1 << bits) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << bits) - 1)), ib)
    return int((ia - ib).abs().max())


def same_bits(a, b):
    return all(torch.equal(x.view(INT_VIEW[x.dtype]), y.view(INT_VIEW[y.dtype]))
               for x, y in zip(a, b))


def tensor_scalars(scalars, dtype=torch.float64):
    return {k: torch.tensor(v, dtype=dtype) for k, v in scalars.items()}


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        sys.exit(1)


def randn(shapes, dtype, gen, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def lion_against_reference(ops):
    gen = torch.Generator().manual_seed(7)
    for dtype, hyper in itertools.product(DTYPES, LION):
        p, g_b, g_lb, m = (randn(SHAPES, dtype, gen) for _ in range(4))
        runs = {}
        for label, fn, scalars in (("reference", _reference.lion_step_, SCALARS),
                                   ("default", ops.lion_step_.default, SCALARS),
                                   ("tensor", ops.lion_step_.tensor, tensor_scalars(SCALARS))):
            q, buf = [t.clone() for t in p], [t.clone() for t in m]
            for _ in range(3):
                fn(q, g_b, g_lb, buf, torch.zeros(()), **hyper, **scalars)
            runs[label] = q + buf
        worst = max(ulps(a, b) for a, b in zip(runs["reference"], runs["default"]))
        limit = 4 if dtype == torch.float32 else 1
        check(worst <= limit, f"lion_step_ {dtype} {hyper}: {worst} ulp from the reference "
                              f"(limit {limit})")
        check(same_bits(runs["default"], runs["tensor"]), "  .tensor == .default bit for bit")


def relative_error(a, b):
    scale = max(abs(b), 1e-30)
    return abs(a - b) / scale


def scan_against_reference(ops):
    gen = torch.Generator().manual_seed(8)
    for dtype, with_lb in itertools.product(DTYPES, (True, False)):
        g_b = randn(SHAPES, dtype, gen)
        g_lb = randn(SHAPES, dtype, gen) if with_lb else []
        start = torch.tensor([1.0, 2.0, 3.0, -4.0], dtype=torch.float64)
        results = {}
        for label, fn, scalars in (("reference", _reference.scan_, SCALARS),
                                   ("default", ops.scan_.default, SCALARS),
                                   ("tensor", ops.scan_.tensor, tensor_scalars(SCALARS))):
            scalars = {k: v for k, v in scalars.items() if k != "lr"}
            found, sums = torch.zeros(()), start.clone()
            fn(g_b, g_lb, found, sums, **scalars)
            results[label] = (found, sums)
        ref_found, ref_sums = results["reference"]
        found, sums = results["default"]
        # the cross term's scale is that of the squares it is bounded by (Cauchy-Schwarz)
        cross_scale = float((ref_sums[1] - start[1]) * (ref_sums[2] - start[2])) ** 0.5
        errors = [relative_error(float(sums[i] - start[i]), float(ref_sums[i] - start[i]))
                  for i in range(3)]
        errors.append(abs(float(sums[3] - ref_sums[3])) / max(cross_scale, 1e-30))
        check(bool(found == ref_found) and max(errors) < 1e-5,
              f"scan_ {dtype} grads_lb={'given' if with_lb else 'empty'}: flag "
              f"{float(found)} (reference {float(ref_found)}), sums within "
              f"{max(errors):.1e} relative")
        check(same_bits(results["default"], results["tensor"]), "  .tensor == .default")
        flag_only = torch.zeros(())
        ops.scan_(g_b, g_lb, flag_only, None, scale_b=-0.7, scale_lb=1.7)
        check(float(flag_only) == 0.0, "  without sums: flag stays 0")


def nonfinite_positions(ops):
    """inf or NaN in g_b or g_lb, at the first, a middle and the last element of the first, a
    middle and the last tensor, with and without sums, each dtype: the flag is set."""
    gen = torch.Generator().manual_seed(9)
    failures = 0
    cases = 0
    for dtype in DTYPES:
        base_b, base_lb = randn(SHAPES, dtype, gen), randn(SHAPES, dtype, gen)
        for which, bad, tensor, where, sums in itertools.product(
                ("g_b", "g_lb"), (float("inf"), float("-inf"), float("nan")),
                (0, len(SHAPES) // 2, len(SHAPES) - 1), ("first", "middle", "last"),
                (False, True)):
            g_b, g_lb = [t.clone() for t in base_b], [t.clone() for t in base_lb]
            target = (g_b if which == "g_b" else g_lb)[tensor].view(-1)
            index = {"first": 0, "middle": target.numel() // 2, "last": target.numel() - 1}[where]
            target[index] = bad
            found = torch.zeros(())
            total = torch.zeros(4, dtype=torch.float64) if sums else None
            ops.scan_(g_b, g_lb, found, total, scale_b=-0.7, scale_lb=1.7)
            ref_found = torch.zeros(())
            _reference.scan_(g_b, g_lb, ref_found, None, scale_b=-0.7, scale_lb=1.7)
            cases += 1
            failures += int(float(found) != 1.0 or float(ref_found) != 1.0)
    check(failures == 0, f"scan_ sets found_inf for inf/NaN in every position: {cases} cases, "
                         f"{failures} missed")


def update_calls(dtype, gen, shapes=SHAPES):
    """(name, args, kwargs) of one call of each update op."""
    p, g_b, g_lb, m, v, vmax = (randn(shapes, dtype, gen) for _ in range(6))
    v = [t.abs() for t in v]
    vmax = [t.abs() for t in vmax]
    steps = [torch.full((), 3.0) for _ in shapes]
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01,
               maximize=False, is_first_step=False, scale_b=-0.7, scale_lb=1.7)
    adam = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=True,
                maximize=False, decoupled_weight_decay=True, scale_b=-0.7, scale_lb=1.7)
    lion = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False, scale_b=-0.7,
                scale_lb=1.7)
    return [("sgd_step_", [p, g_b, g_lb, m], sgd),
            ("adam_step_", [p, g_b, g_lb, m, v, vmax, steps], adam),
            ("lion_step_", [p, g_b, g_lb, m], lion),
            ("extrapolate_", [p, g_b, g_lb], dict(scale_b=-0.7, scale_lb=1.7))]


def with_found_inf(args, found_inf):
    """The op's positional arguments with found_inf in its place (after the lists)."""
    lists = [a for a in args if isinstance(a, list)]
    return lists + [found_inf]


def found_inf_set_changes_nothing(ops):
    gen = torch.Generator().manual_seed(10)
    for dtype in DTYPES:
        for name, args, kwargs in update_calls(dtype, gen):
            before = [[t.clone() for t in a] for a in args]
            for overload in ("default", "tensor"):
                kw = dict(kwargs)
                if overload == "tensor":
                    kw.update(tensor_scalars({k: kw[k] for k in ("lr", "scale_b", "scale_lb")
                                              if k in kw}))
                getattr(getattr(ops, name), overload)(*with_found_inf(args, torch.ones(())),
                                                     **kw)
            unchanged = all(same_bits(a, b) for a, b in zip(args, before))
            check(unchanged, f"{name} {dtype}: found_inf = 1 changes nothing (step counts too)")


def empty_lists_and_tensors(ops):
    gen = torch.Generator().manual_seed(11)
    for name, args, kwargs in update_calls(torch.float32, gen):
        empty = [[] for a in args]
        getattr(ops, name)(*with_found_inf(empty, torch.zeros(())), **kwargs)
    ops.scan_([], [], torch.zeros(()), torch.zeros(4, dtype=torch.float64), scale_b=-0.7,
              scale_lb=1.7)
    check(True, "every op accepts empty lists")
    shapes = [(0,), (5,), (0, 3), (70000,), (0,)]
    kept = [i for i, shape in enumerate(shapes) if shape != (0,) and shape != (0, 3)]
    for name, args, kwargs in update_calls(torch.float32, gen, shapes):
        alone = [[a[i].clone() for i in kept] for a in args]
        ref_args = [[t.clone() for t in a] for a in args]
        getattr(ops, name)(*with_found_inf(args, torch.zeros(())), **kwargs)
        getattr(ops, name)(*with_found_inf(alone, torch.zeros(())), **kwargs)
        getattr(_reference, name)(*with_found_inf(ref_args, torch.zeros(())), **kwargs)
        same = all(same_bits([a[i] for i in kept], b) for a, b in zip(args, alone))
        steps_ok = name != "adam_step_" or same_bits(args[-1], ref_args[-1])
        check(same and steps_ok, f"{name} with empty tensors among others: the others' results "
                                 "as without them; every step count advances")
    g = randn(shapes, torch.float32, gen)
    found, sums = torch.zeros(()), torch.zeros(4, dtype=torch.float64)
    ref_sums = torch.zeros(4, dtype=torch.float64)
    ops.scan_(g, g, found, sums, scale_b=-0.7, scale_lb=1.7)
    _reference.scan_(g, g, torch.zeros(()), ref_sums, scale_b=-0.7, scale_lb=1.7)
    check(torch.allclose(sums, ref_sums, rtol=1e-5, atol=0) and float(found) == 0,
          "scan_ with empty tensors among others")


def extrapolate_into_grads_lb(ops):
    """out = grads_lb gives what a separate out gives, bit for bit."""
    gen = torch.Generator().manual_seed(12)
    for dtype in DTYPES:
        g_b, g_lb = randn(SHAPES, dtype, gen), randn(SHAPES, dtype, gen)
        separate = [torch.empty_like(t) for t in g_lb]
        ops.extrapolate_(separate, g_b, g_lb, torch.zeros(()), scale_b=-0.7, scale_lb=1.7)
        ops.extrapolate_(g_lb, g_b, g_lb, torch.zeros(()), scale_b=-0.7, scale_lb=1.7)
        check(same_bits(g_lb, separate), f"extrapolate_ {dtype} with out = grads_lb: as with a "
                                         "separate out")


def main():
    built = _build.build("cpu")
    check(built.ok, f"CPU build: {built.error or built.library_path}")
    ops = torch.ops.gerne_kernels
    lion_against_reference(ops)
    scan_against_reference(ops)
    nonfinite_positions(ops)
    found_inf_set_changes_nothing(ops)
    empty_lists_and_tensors(ops)
    extrapolate_into_grads_lb(ops)
    print("all checks passed")


if __name__ == "__main__":
    assert _ops.BY_NAME  # the schemas are defined before the library loads
    main()
