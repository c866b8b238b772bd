"""lr, beta and the loss scales as tensors: the optimizers' tensor path (gerne_kernels/_scalars.py).
The ops' .tensor overloads are tested op by op on every backend in tests/ops (test_op_contract:
.tensor == .default bit for bit, bad scalars named; test_gpu_behaviour: no host sync, CUDA graphs
following device lr and beta).

The oracle is the float path, itself held against the reference and torch.optim elsewhere: the
same values given as tensors must give the same bits. On a GPU, a GERNE step with
device-resident lr and beta must not synchronise with the host, and a whole training step
captured in a CUDA graph follows them.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import gerne_kernels as gk
from gerne_kernels import _backends
from gerne_testing import (assert_same, lean_step, loss_of, make_batches, make_model, snapshot,
                           stash_step)

HAS_GPU = torch.cuda.is_available()
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": dict(optimizer="adamw", lr=1e-2, weight_decay=0.05, amsgrad=True),
}
# (lr factor, beta) per step, as schedules would set them.
SCHEDULE = [(1.0, 1.5), (0.5, 0.5), (0.25, 3.0), (0.125, 0.0)]


# ---------------------------------------------------------------------------------------------
# The optimizers

def schedule_step(opt, step, base_lr, as_tensors):
    lr_factor, beta = SCHEDULE[step]
    for group in opt.param_groups:
        if as_tensors:  # in place, as torch's LR schedulers update a tensor lr
            group["lr"].fill_(base_lr * lr_factor)
            group["beta"].fill_(beta)
        else:
            group["lr"], group["beta"] = base_lr * lr_factor, beta


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("train_step", [stash_step, lean_step], ids=["stash", "lean"])
def test_tensor_lr_and_beta_give_the_float_path_bits(backend, name, train_step):
    """Schedules that move lr and beta each step: as floats, and as tensors updated in place,
    in the stash mode and the memory-lean mode."""
    hyper = dict(OPTIMIZERS[name])
    base_lr = hyper.pop("lr")
    runs = []
    for as_tensors in (False, True):
        model = make_model()
        lr = torch.tensor(base_lr, dtype=torch.float64) if as_tensors else base_lr
        beta = torch.tensor(1.5, dtype=torch.float64) if as_tensors else 1.5
        opt = gk.GERNE(model.parameters(), lr=lr, beta=beta, backend=backend, **hyper)
        for step, (x_b, x_lb) in enumerate(make_batches(len(SCHEDULE))):
            schedule_step(opt, step, base_lr, as_tensors)
            train_step(model, opt, x_b, x_lb)
        if as_tensors:
            assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        runs.append(snapshot(model, opt.state_dict()["state"]))
    assert_same(*runs)


def test_lr_scheduler_keeps_a_tensor_lr_and_the_float_path_bits(backend):
    runs = []
    for as_tensor in (False, True):
        model = make_model()
        lr = torch.tensor(0.1) if as_tensor else 0.1
        opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=lr, momentum=0.9, beta=1.0,
                       backend=backend)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        for x_b, x_lb in make_batches(4):
            stash_step(model, opt, x_b, x_lb)
            scheduler.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == as_tensor
        runs.append(snapshot(model, opt.state_dict()["state"]))
    assert_same(*runs)


def test_wrapper_takes_a_tensor_beta(backend):
    runs = []
    for as_tensor in (False, True):
        model = make_model()
        beta = torch.tensor(2.0) if as_tensor else 2.0
        opt = gk.GERNEWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                              beta=beta, backend=backend)
        for step, (x_b, x_lb) in enumerate(make_batches(3)):
            if as_tensor:
                opt.param_groups[0]["beta"].fill_(SCHEDULE[step][1])
            else:
                opt.param_groups[0]["beta"] = SCHEDULE[step][1]
            stash_step(model, opt, x_b, x_lb)
        runs.append(snapshot(model, opt.base.state_dict()["state"]))
    assert_same(*runs)


@pytest.mark.parametrize("key,value,message", [
    ("lr", torch.tensor([0.1, 0.2]), "lr must be a float or a one-element tensor"),
    ("beta", torch.tensor([1.0, 2.0]), "beta must be a float or a one-element tensor"),
    ("beta", torch.tensor(-2.0), "beta = -2.0 is below -1"),
    ("lr", torch.tensor(-0.1), "learning rate lr"),
])
def test_bad_tensor_hyperparameters_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        gk.GERNE(make_model().parameters(), **{key: value})


@pytest.mark.skipif(not _backends.status("cpu")[0], reason="the cpu backend is not built")
def test_compiled_step_follows_tensor_lr_and_beta_without_recompiling():
    """lr and beta as tensors are graph inputs: moving them never recompiles the step."""
    torch._dynamo.reset()
    hyper = dict(OPTIMIZERS["adamw"])
    base_lr = hyper.pop("lr")
    model, ref = make_model(), make_model()
    opt = gk.GERNE(model.parameters(), lr=torch.tensor(base_lr, dtype=torch.float64),
                   beta=torch.tensor(1.5, dtype=torch.float64), backend="cpu", **hyper)
    ref_opt = gk.GERNE(ref.parameters(), lr=base_lr, beta=1.5, backend="cpu", **hyper)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter, fullgraph=True)
    try:
        for step, (x_b, x_lb) in enumerate(make_batches(len(SCHEDULE))):
            schedule_step(opt, step, base_lr, as_tensors=True)
            schedule_step(ref_opt, step, base_lr, as_tensors=False)
            opt.zero_grad()
            loss_of(model, x_b).backward()
            opt.stash_biased()
            loss_of(model, x_lb).backward()
            if step == 0:
                opt.step()  # creating the state reads the device once: eager
            else:
                compiled_step()
            if step == 1:
                # Dynamo may restart its first analysis once (counted as a frame); after that,
                # new values of lr and beta must not compile anything.
                first_compile_frames = counter.frame_count
            stash_step(ref, ref_opt, x_b, x_lb)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == first_compile_frames
    inputs = [node.name for node in counter.graphs[-1].graph.find_nodes(op="placeholder")]
    assert any("lr" in name for name in inputs) and any("beta" in name for name in inputs)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# On a GPU

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def gpu_backends():
    names = []
    for name in ("cuda", "triton"):
        if HAS_GPU and _backends.status(name)[0]:
            names.append(name)
    return names


@gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_with_device_lr_and_beta_never_syncs(backend_name, name):
    """After the first step (which creates the state), a GERNE step with lr and beta on the
    device runs without one host synchronisation, and matches the float path."""
    if backend_name not in gpu_backends():
        pytest.skip(f"the {backend_name} backend is unavailable")
    hyper = dict(OPTIMIZERS[name])
    base_lr = hyper.pop("lr")
    runs = []
    for as_tensors in (False, True):
        model = make_model().cuda()
        lr = torch.tensor(base_lr, dtype=torch.float64, device="cuda") if as_tensors else base_lr
        beta = torch.tensor(1.5, dtype=torch.float64, device="cuda") if as_tensors else 1.5
        opt = gk.GERNE(model.parameters(), lr=lr, beta=beta, backend=backend_name, **hyper)
        for step, (x_b, x_lb) in enumerate(make_batches(len(SCHEDULE))):
            x_b, x_lb = x_b.cuda(), x_lb.cuda()
            schedule_step(opt, step, base_lr, as_tensors)
            opt.zero_grad()
            loss_of(model, x_b).backward()
            opt.stash_biased()
            loss_of(model, x_lb).backward()
            if as_tensors and step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_whole_training_step_captured_in_a_cuda_graph(backend_name):
    """torch's whole-network capture recipe with GERNE: both forwards and backwards, the stash
    and the step in one CUDA graph, with lr and beta as device tensors moved between replays;
    the replays match eager steps given the same batches and values."""
    if backend_name not in gpu_backends():
        pytest.skip(f"the {backend_name} backend is unavailable")
    base_lr, steps = 0.05, 8
    batches = [(x_b.cuda(), x_lb.cuda()) for x_b, x_lb in make_batches(steps)]
    values = [(base_lr * (0.9 ** i), 0.5 + 0.25 * (i % 3)) for i in range(steps)]
    model, ref = make_model().cuda(), make_model().cuda()
    lr = torch.tensor(base_lr, dtype=torch.float64, device="cuda")
    beta = torch.tensor(values[0][1], dtype=torch.float64, device="cuda")
    opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=lr, momentum=0.9, beta=beta,
                   backend=backend_name)
    ref_opt = gk.GERNE(ref.parameters(), optimizer="sgd", lr=base_lr, momentum=0.9,
                       beta=values[0][1], backend=backend_name)
    static_b, static_lb = (x.clone() for x in batches[0])

    def set_values(i):
        lr.fill_(values[i][0])
        beta.fill_(values[i][1])
        ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["beta"] = values[i]
        static_b.copy_(batches[i][0])
        static_lb.copy_(batches[i][1])

    def training_step():
        loss_of(model, static_b).backward()
        opt.stash_biased()
        loss_of(model, static_lb).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state, compiles the kernels
        for i in range(3):
            set_values(i)
            opt.zero_grad(set_to_none=True)
            training_step()
            stash_step(ref, ref_opt, *batches[i])
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training_step()
    for i in range(3, steps):
        set_values(i)
        graph.replay()
        stash_step(ref, ref_opt, *batches[i])
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
