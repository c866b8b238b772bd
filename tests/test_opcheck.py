"""The C++ CPU ops are well-formed custom ops: torch.library.opcheck and torch.compile.

opcheck verifies that the schemas declare every mutation, that the fake implementations agree
with the kernels (so FakeTensor tracing works) and that AOT dispatch handles the ops; the compile
test runs a function that calls an op under torch.compile(fullgraph=True) and compares it with
eager execution.
"""

import pytest
import torch

from gerne_kernels import _ops
from gerne_testing import require_cpu_build


@pytest.fixture(scope="module", autouse=True)
def cpu_built():
    require_cpu_build()


SHAPES = [(5,), (3, 2), (0,), (33,)]


def tensors(dtype, positive=False):
    out = [torch.randn(shape).to(dtype) for shape in SHAPES]
    return [t.abs() for t in out] if positive else out


def sgd_sample(dtype, momentum, nesterov, weight_decay, maximize, is_first_step, check_finite):
    params = tensors(dtype)
    buffers = tensors(dtype) if momentum else []
    args = (params, tensors(dtype), tensors(dtype), buffers, torch.zeros(()))
    kwargs = dict(lr=0.1, momentum=momentum, dampening=0.0, nesterov=nesterov,
                  weight_decay=weight_decay, maximize=maximize, is_first_step=is_first_step,
                  scale_b=-2.0, scale_lb=3.0, check_finite=check_finite)
    return args, kwargs


def adam_sample(dtype, amsgrad, decoupled_weight_decay, maximize, check_finite):
    params = tensors(dtype)
    args = (params, tensors(dtype), tensors(dtype), tensors(dtype), tensors(dtype, positive=True),
            tensors(dtype, positive=True) if amsgrad else [],
            [torch.tensor(float(i)) for i in range(len(params))], torch.zeros(()))
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, amsgrad=amsgrad,
                  maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                  scale_b=-1.0, scale_lb=2.0, check_finite=check_finite)
    return args, kwargs


def extrapolate_sample(dtype, check_finite):
    args = (tensors(dtype), tensors(dtype), tensors(dtype), torch.zeros(()))
    return args, dict(scale_b=-0.5, scale_lb=1.5, check_finite=check_finite)


SAMPLES = {
    "sgd_step_": [
        lambda: sgd_sample(torch.float32, 0.9, False, 0.0, False, False, True),
        lambda: sgd_sample(torch.float32, 0.9, True, 0.01, False, True, False),
        lambda: sgd_sample(torch.bfloat16, 0.0, False, 0.01, True, False, True),
        lambda: sgd_sample(torch.float16, 0.5, False, 0.0, False, False, True),
    ],
    "adam_step_": [
        lambda: adam_sample(torch.float32, False, True, False, True),
        lambda: adam_sample(torch.float32, True, False, True, False),
        lambda: adam_sample(torch.bfloat16, True, True, False, True),
        lambda: adam_sample(torch.float16, False, False, False, True),
    ],
    "extrapolate_": [
        lambda: extrapolate_sample(torch.float32, True),
        lambda: extrapolate_sample(torch.bfloat16, False),
        lambda: extrapolate_sample(torch.float16, True),
    ],
}


@pytest.mark.parametrize("name,index", [(name, i) for name, samples in SAMPLES.items()
                                        for i in range(len(samples))])
def test_opcheck(name, index):
    args, kwargs = SAMPLES[name][index]()
    results = torch.library.opcheck(_ops.op(name), args, kwargs)
    assert all(result == "SUCCESS" for result in results.values()), results


def clone_args(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args]


def flat_tensors(args):
    return [t for a in args for t in (a if isinstance(a, list) else [a])]


@pytest.mark.parametrize("name", ["sgd_step_", "adam_step_"])
def test_compiled_step_matches_eager(name):
    """torch.compile traces the op (no graph break) and runs the same kernel as eager."""
    torch._dynamo.reset()
    args, kwargs = SAMPLES[name][0]()
    op = _ops.op(name)

    def two_steps(*tensors):
        op(*tensors, **kwargs)
        op(*tensors, **kwargs)

    compiled = torch.compile(two_steps, fullgraph=True)
    eager_args, compiled_args = clone_args(args), clone_args(args)
    two_steps(*eager_args)
    compiled(*compiled_args)
    for a, b in zip(flat_tensors(compiled_args), flat_tensors(eager_args), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The op really ran: the parameters moved.
    assert not torch.equal(flat_tensors(compiled_args)[1], flat_tensors(args)[1])
