"""torch.compile: GERNE.step() traces into one graph around the fused op (fullgraph=True, no
recompilation from step to step), and a compiled training step matches eager.

Tracing needs the fused ops (the reference path reads the device in Python): these tests run on
the "cpu" backend and skip without it. They compile with the aot_eager backend, which runs
Dynamo and AOTAutograd's functionalization of the mutating op, as inductor does, without
inductor's C++ compilation (a minute on two cores); GERNE_SLOW_TESTS=1 adds inductor.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import gerne_kernels as gk
from gerne_kernels import _backends
from gerne_testing import make_batches, make_model, stash_step

pytestmark = pytest.mark.skipif(not _backends.status("cpu")[0],
                                reason="the cpu backend (C++ kernel) is not built")

COMPILERS = ["aot_eager"] + (["inductor"] if os.environ.get("GERNE_SLOW_TESTS") == "1" else [])
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True),
    "adamw": dict(optimizer="adamw", lr=1e-2, amsgrad=True),
}


def make(name):
    model = make_model()
    return model, gk.GERNE(model.parameters(), beta=1.5, backend="cpu", **OPTIMIZERS[name])


def fused_op_calls(graphs):
    return [node.target for graph in graphs for node in graph.graph.nodes
            if node.op == "call_function" and "gerne_kernels" in str(node.target)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_step_is_one_graph_and_matches_eager(name, compiler):
    (model, opt), (ref, ref_opt) = make(name), make(name)
    counter = CompileCounterWithBackend(compiler)
    compiled_step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i, (x_b, x_lb) in enumerate(make_batches(5)):
        opt.zero_grad()
        model(x_b).square().mean().backward()
        opt.stash_biased()
        model(x_lb).square().mean().backward()
        if i == 0:
            opt.step()  # creating the state reads the device once: eager
        else:
            compiled_step()
        ref_opt.zero_grad()
        ref(x_b).square().mean().backward()
        ref_opt.stash_biased()
        ref(x_lb).square().mean().backward()
        ref_opt.step()
    assert counter.frame_count == 1  # one graph, never recompiled
    assert len(fused_op_calls(counter.graphs)) == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_compiled_training_step_matches_eager():
    """The whole step compiled: Dynamo breaks the graph at each .backward() (not at the op)."""
    (model, opt), (ref, ref_opt) = make("sgd"), make("sgd")
    counter = CompileCounterWithBackend("aot_eager")
    train_step = torch.compile(lambda x_b, x_lb: stash_step(model, opt, x_b, x_lb),
                               backend=counter)
    for x_b, x_lb in make_batches(4):
        train_step(x_b, x_lb)
        stash_step(ref, ref_opt, x_b, x_lb)
    assert fused_op_calls(counter.graphs)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
