"""sgd_step_ on every backend against the oracle (harness.run_against_oracle: the reference,
or for the reference backend the reference in float64): torch.optim.SGD's update (momentum,
dampening, nesterov, weight decay, maximize) on g = scale_lb * g_lb + scale_b * g_b, step after
step from a fresh state (the first step writes the momentum buffers, which start as NaN)."""

import torch

import harness

OP = "sgd_step_"


@harness.over_cases(harness.hyper_grid(OP, quick=(3, 2)))
def test_sgd_step_matches_the_oracle(backend, case):
    """Every dtype x hyperparameter set x beta, on ragged shapes, several steps."""
    harness.check_op(backend, OP, case.dtype, beta=case.beta, **case.options)


class TestLayouts(harness.LayoutChecks):
    OP = OP
    OPTIONS = dict(hyper=harness.SGD_HYPERS[2])
    BLOCKS_DTYPE = torch.bfloat16


@harness.over_backends(["reference", "triton"])
def test_a_list_mixing_dtypes(backend):
    """float32 and float16 tensors in one call (Triton launches one group per dtype; the C++
    ops refuse it, see test_op_contract's argument errors)."""
    problem = harness.build(OP, backend, shapes=[(7,), (1500,)], hyper=harness.SGD_HYPERS[1])
    for name in ("params", "momentum_buffers"):
        problem.tensors[name][1] = problem.tensors[name][1].half()
    for grads in problem.gradients:
        grads.grads_b[1], grads.grads_lb[1] = grads.grads_b[1].half(), grads.grads_lb[1].half()
    harness.run_against_oracle(backend, problem.use_step(0))
