"""adam_step_ on every backend against the oracle (harness.run_against_oracle: the reference,
or for the reference backend the reference in float64): torch.optim.Adam's and AdamW's update
(amsgrad, maximize, coupled or decoupled weight decay) on g = scale_lb * g_lb + scale_b * g_b,
step after step, from mid-training moments whose step counts differ per tensor (0, 3, 1, 40:
the bias corrections differ per tensor; the op advances each count on the device)."""

import torch

import harness

OP = "adam_step_"


@harness.over_cases(harness.hyper_grid(OP, quick=(3, 4)))
def test_adam_step_matches_the_oracle(backend, case):
    """Every dtype x hyperparameter set x beta, on ragged shapes, several steps."""
    harness.check_op(backend, OP, case.dtype, beta=case.beta, **case.options)


class TestLayouts(harness.LayoutChecks):
    OP = OP


@harness.over_backends(["reference", "cpu"])
def test_float64_step_counters(backend):
    """torch.optim makes float64 step counts when the default dtype is float64; the host
    backends count them as well (the GPU backends take float32 counts only)."""
    problem = harness.check_op(backend, OP, hyper=harness.ADAM_HYPERS[2],
                               step_dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in problem.tensors["state_steps"])


def test_step_counts_advance_by_one_per_step(backend):
    """Each tensor's count advances once per step from where it was, whatever the others'
    (the oracle comparison checks the same; this says it without the reference)."""
    problem = harness.check_op(backend, OP, shapes=[(3,), (0,), (70,), (1,)],
                               first_steps=(0, 7, 1, 40))
    steps = len(problem.gradients)
    assert [float(s) for s in problem.tensors["state_steps"]] == [
        float(first + steps) for first in (0, 7, 1, 40)]
