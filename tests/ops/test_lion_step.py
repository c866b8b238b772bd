"""lion_step_ on every backend: Lion (Chen et al. 2023) fed g = scale_lb * g_lb + scale_b * g_b,

    c = beta1 * m + (1 - beta1) * g;   p = p * (1 - lr * wd) - lr * sign(c);
    m = beta2 * m + (1 - beta2) * g      (maximize: g -> -g; sign(0) = 0)

against the oracle (harness.run_against_oracle: the reference, or for the reference backend
the reference in float64) and against that formula written here in float64. Where c lies within
float32 rounding of 0, two correct computations may take opposite signs: those elements of p
are left out of the comparison (harness.lion_sign_ties); an exact 0 is not."""

import pytest
import torch

import harness

OP = "lion_step_"


@harness.over_cases(harness.hyper_grid(OP, quick=(2, 1)))
def test_lion_step_matches_the_oracle(backend, case):
    """Every dtype x hyperparameter set x beta, on ragged shapes, several steps."""
    harness.check_op(backend, OP, case.dtype, beta=case.beta, **case.options)


def lion_in_float64(problem):
    """(params, exp_avgs) after one Lion step from problem's state, in float64, from the
    formula of this file's docstring."""
    s = problem.scalars
    lr, beta1, beta2, wd = s["lr"], s["beta1"], s["beta2"], s["weight_decay"]
    params, exp_avgs = [], []
    for p, m, g_b, g_lb in zip(problem.tensors["params"], problem.tensors["exp_avgs"],
                               problem.tensors["grads_b"], problem.tensors["grads_lb"]):
        p, m = p.double(), m.double()
        g = float(s["scale_lb"]) * g_lb.double() + float(s["scale_b"]) * g_b.double()
        if s["maximize"]:
            g = -g
        c = beta1 * m + (1 - beta1) * g
        params.append(p * (1 - lr * wd) - lr * torch.sign(c))
        exp_avgs.append(beta2 * m + (1 - beta2) * g)
    return params, exp_avgs


ZEROS = slice(0, 4)  # elements whose m, g_b and g_lb are all 0: c = 0, sign(c) = 0


@pytest.mark.parametrize("hyper_index", range(len(harness.LION_HYPERS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lion_step_is_the_lion_formula(backend, dtype, hyper_index):
    """Two steps against lion_in_float64, with elements where c = 0 exactly: there p only
    decays (sign(0) = 0) and m stays 0."""
    hyper = harness.LION_HYPERS[hyper_index]
    shapes = [(33,), (7, 5), (1,)] if backend.interpreted else [(33,), (7, 5), (1,), (40000,)]
    problem = harness.build(OP, backend, dtype, shapes, hyper=hyper, beta=1.5, steps=2)
    lists = [problem.tensors["exp_avgs"]] + [
        grads for g in problem.gradients for grads in (g.grads_b, g.grads_lb)]
    for tensors in lists:
        for t in tensors[:2]:
            t.view(-1)[ZEROS] = 0
    op = backend.op(OP)
    for step in range(2):
        problem.use_step(step)
        before = problem.copy()
        problem.call(op, step)
        params, exp_avgs = lion_in_float64(before)
        ties = harness.lion_sign_ties(before)["params"]
        harness.assert_all_close(problem.tensors["params"], params, f"step {step}: params",
                                 exempt=ties)
        harness.assert_all_close(problem.tensors["exp_avgs"], exp_avgs, f"step {step}: exp_avgs")
        for p, p0 in zip(problem.tensors["params"][:2], before.tensors["params"][:2]):
            decayed = p0.view(-1)[ZEROS].double() * (1 - hyper["lr"] * hyper["weight_decay"])
            harness.assert_all_close([p.view(-1)[ZEROS]], [decayed],
                                     f"step {step}: params where c = 0")
        for m in problem.tensors["exp_avgs"][:2]:
            assert not m.view(-1)[ZEROS].any(), "m where m = g = 0"


class TestLayouts(harness.LayoutChecks):
    OP = OP
    BLOCKS_DTYPE = torch.bfloat16
