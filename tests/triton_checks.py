"""The Triton ops against the reference path, shared by two test files:

  tests/interpret/  the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, a
                    subprocess started by tests/test_triton_kernel.py), small sizes;
  tests/test_triton_kernel.py  the compiled kernels on a GPU, larger sizes (skipped without one);
  tests/test_cuda_kernel.py    the same checks on the CUDA ops (prefix="": sgd_step_, ...),
  tests/test_cpu_kernel.py     check_tensor_scalars on the C++ CPU ops.

Each check builds one random problem, runs a few steps of the fused op on one copy and of
gerne_kernels._reference (the specification) on another, and compares every tensor the op may
write. States that must not be read (momentum buffers before the first step, max_exp_avg_sq
without amsgrad) start as NaN, so reading them would show.
"""

import copy

import torch

from gerne_kernels import _ops, _reference

# float32: a few ulps (the GPU contracts a * b + c into one fma, torch's CPU lerp is an fma).
# bfloat16/float16: float32 math rounded once per step to the storage type, where a float32
# result a few ulps off the reference's can land on the other side of a rounding tie: at most a
# few storage ulps anywhere, and one ulp for all but a small fraction of elements.
FLOAT32_TOLERANCE = dict(rtol=2e-6, atol=1e-6)
STORAGE_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
MAX_ONE_ULP_MISMATCH_FRACTION = 0.01


SGD_HYPERS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.01,
         maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.02, maximize=False),
    dict(lr=0.05, momentum=0.5, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=True),
    dict(lr=0.2, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=True),
]
ADAM_HYPERS = [
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
]


def fused_op(name, prefix="triton_", overload="default"):
    """The op gerne_kernels::<prefix><name>.<overload>; for the Triton ops, their
    implementations are registered first (importing gerne_kernels.triton_kernels does that)."""
    if prefix == "triton_":
        import gerne_kernels.triton_kernels  # noqa: F401
    return _ops.op(prefix + name, overload)


def scales(beta, inv_scale_b=1.0, inv_scale_lb=1.0):
    """(scale_b, scale_lb) as the optimizer computes them."""
    return -beta * inv_scale_b, (1.0 + beta) * inv_scale_lb


def random_tensors(sizes, dtype, device, generator, kind="normal", scale=1.0):
    out = []
    for n in sizes:
        if kind == "normal":
            t = torch.randn(n, generator=generator) * scale
        else:
            t = torch.rand(n, generator=generator) * scale
        out.append(t.to(device=device, dtype=dtype))
    return out


def gradients(sizes, dtype, device, generator, steps, inv_scale_b=1.0, inv_scale_lb=1.0):
    """Per step: (grads_b, grads_lb), each batch's gradient multiplied by its loss scale."""
    return [(random_tensors(sizes, dtype, device, generator, scale=1.0 / inv_scale_b),
             random_tensors(sizes, dtype, device, generator, scale=1.0 / inv_scale_lb))
            for _ in range(steps)]


def nan_like(tensors):
    return [torch.full_like(t, float("nan")) for t in tensors]


def assert_all_close(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, **FLOAT32_TOLERANCE,
                                       msg=lambda m, i=i: f"{what}[{i}]: {m}")
            continue
        eps = STORAGE_EPS[dtype]
        torch.testing.assert_close(a, e, rtol=4 * eps, atol=1e-5,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")
        a32, e32 = a.float(), e.float()
        beyond_one_ulp = (a32 - e32).abs() > eps * e32.abs() + 1e-5
        fraction = beyond_one_ulp.float().mean().item() if a.numel() else 0.0
        assert fraction <= MAX_ONE_ULP_MISMATCH_FRACTION, (
            f"{what}[{i}]: {fraction:.2%} of the elements differ from the reference by more "
            f"than one {dtype} ulp")


def check_sgd(device, dtype, sizes, hyper, *, beta=1.0, steps=3, inv_scales=(1.0, 1.0),
              seed=0, prefix="triton_"):
    """Several SGD steps from a fresh state (the first with is_first_step)."""
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(sizes, dtype, device, generator)
    has_momentum = hyper["momentum"] != 0
    buffers = nan_like(params) if has_momentum else []
    grads = gradients(sizes, dtype, device, generator, steps, *inv_scales)
    scale_b, scale_lb = scales(beta, *inv_scales)
    results = []
    for op in (fused_op("sgd_step_", prefix), _reference.sgd_step_):
        p, bufs = copy.deepcopy(params), copy.deepcopy(buffers)
        found_inf = torch.zeros((), device=device)
        for step, (g_b, g_lb) in enumerate(grads):
            op(p, g_b, g_lb, bufs, found_inf, **hyper, is_first_step=has_momentum and step == 0,
               scale_b=scale_b, scale_lb=scale_lb, check_finite=step % 2 == 0)
        assert found_inf.item() == 0
        results.append((p, bufs))
    (p, bufs), (p_ref, bufs_ref) = results
    assert_all_close(p, p_ref, dtype, "params")
    assert_all_close(bufs, bufs_ref, dtype, "momentum_buffers")


def adam_state(sizes, dtype, device, generator, amsgrad, first_steps):
    """Mid-training moments and per-tensor step counts (first_steps, cycled over the tensors)."""
    exp_avgs = random_tensors(sizes, dtype, device, generator, scale=0.1)
    exp_avg_sqs = random_tensors(sizes, dtype, device, generator, kind="uniform", scale=0.01)
    if amsgrad:
        extra = random_tensors(sizes, dtype, device, generator, kind="uniform", scale=0.01)
        max_exp_avg_sqs = [v + e for v, e in zip(exp_avg_sqs, extra)]
    else:
        max_exp_avg_sqs = []
    steps = [torch.tensor(float(first_steps[i % len(first_steps)]), device=device)
             for i in range(len(sizes))]
    return exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps


def check_adam(device, dtype, sizes, hyper, *, beta=1.0, steps=3, first_steps=(0, 3, 1, 40),
               inv_scales=(1.0, 1.0), seed=0, prefix="triton_"):
    """Several Adam/AdamW steps from a state whose step counts differ per tensor."""
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(sizes, dtype, device, generator)
    state = adam_state(sizes, dtype, device, generator, hyper["amsgrad"], first_steps)
    grads = gradients(sizes, dtype, device, generator, steps, *inv_scales)
    scale_b, scale_lb = scales(beta, *inv_scales)
    results = []
    for op in (fused_op("adam_step_", prefix), _reference.adam_step_):
        p, (m, v, vmax, t) = copy.deepcopy(params), copy.deepcopy(state)
        found_inf = torch.zeros((), device=device)
        for step, (g_b, g_lb) in enumerate(grads):
            op(p, g_b, g_lb, m, v, vmax, t, found_inf, **hyper, scale_b=scale_b,
               scale_lb=scale_lb, check_finite=step % 2 == 1)
        assert found_inf.item() == 0
        results.append((p, m, v, vmax, t))
    for name, actual, expected in zip(("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                                      results[0], results[1]):
        assert_all_close(actual, expected, dtype, name)
    assert [s.item() for s in results[0][4]] == [s.item() for s in results[1][4]]


def check_extrapolate(device, dtype, sizes, *, beta=1.0, alias_out=False, out_dtype=None,
                      inv_scales=(1.0, 1.0), seed=0, prefix="triton_"):
    """out = scale_lb * g_lb + scale_b * g_b, optionally written over g_lb itself."""
    generator = torch.Generator().manual_seed(seed)
    (g_b, g_lb), = gradients(sizes, dtype, device, generator, 1, *inv_scales)
    scale_b, scale_lb = scales(beta, *inv_scales)
    results = []
    for op in (fused_op("extrapolate_", prefix), _reference.extrapolate_):
        lb = copy.deepcopy(g_lb)
        out = lb if alias_out else nan_like([g.to(out_dtype or dtype) for g in g_lb])
        op(out, g_b, lb, torch.zeros((), device=device), scale_b=scale_b, scale_lb=scale_lb,
           check_finite=True)
        results.append(out)
    assert_all_close(results[0], results[1], out_dtype or dtype, "out")


def problem_for(op_name, device, dtype, sizes, seed=0, prefix="triton_"):
    """(op, reference, args, kwargs): one ready call of each op with fresh tensors, for the
    skip tests (found_inf, check_finite). The kwargs leave out check_finite."""
    generator = torch.Generator().manual_seed(seed)
    params = random_tensors(sizes, dtype, device, generator)
    (g_b, g_lb), = gradients(sizes, dtype, device, generator, 1)
    scale_b, scale_lb = scales(1.0)
    if op_name == "sgd_step_":
        args = [params, g_b, g_lb, random_tensors(sizes, dtype, device, generator)]
        kwargs = dict(SGD_HYPERS[3], is_first_step=False)
    elif op_name == "adam_step_":
        state = adam_state(sizes, dtype, device, generator, True, (0, 5))
        args = [params, g_b, g_lb, *state]
        kwargs = dict(ADAM_HYPERS[3])
    else:
        args = [random_tensors(sizes, dtype, device, generator), g_b, g_lb]
        kwargs = {}
    kwargs.update(scale_b=scale_b, scale_lb=scale_lb)
    return fused_op(op_name, prefix), getattr(_reference, op_name), args, kwargs


def check_skipped(op_name, device, dtype, sizes, *, found_on_entry=0.0, corrupt=None,
                  check_finite=True, prefix="triton_"):
    """A step that must change nothing: found_inf set on entry, or (corrupt = (batch index,
    tensor index, element index, value)) an inf/NaN in a gradient with check_finite. The Triton
    op and the reference must agree on found_inf afterwards, and nothing else may change."""
    op, reference, args, kwargs = problem_for(op_name, device, dtype, sizes, prefix=prefix)
    if corrupt is not None:
        batch, tensor, element, value = corrupt
        args[1 + batch][tensor].view(-1)[element] = value
    outcomes = []
    for function in (op, reference):
        call_args = copy.deepcopy(args)
        found_inf = torch.full((), found_on_entry, device=device)
        function(*call_args, found_inf, **kwargs, check_finite=check_finite)
        outcomes.append(found_inf.item())
        for i, (after, before) in enumerate(zip(call_args, args)):
            if i in (1, 2):
                continue  # gradients are inputs
            for a, b in zip(after, before):
                assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), \
                    f"{function}: argument {i} changed although the step was skipped"
    assert outcomes[0] == outcomes[1], f"found_inf: triton {outcomes[0]}, reference {outcomes[1]}"
    return outcomes[0]


def check_gerne_against_torch_optim(device, kind, torch_cls, hyper, *, beta=1.5, steps=4,
                                    width=40, batch=16):
    """GERNE(..., backend="triton") against torch.optim fed the extrapolated gradient
    (1 + beta) g_lb - beta g_b, formed independently with torch ops; returns the optimizer."""
    import gerne_kernels as gk

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(7, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 3)).to(device)
    ref = copy.deepcopy(model)

    def loss_of(net, x):
        return net(x).square().mean()

    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=beta, backend="triton", **hyper)
    ref_opt = torch_cls(ref.parameters(), foreach=False, **hyper)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x_b, x_lb = (torch.randn(batch, 7, generator=generator).to(device) for _ in range(2))
        opt.zero_grad()
        loss_of(model, x_b).backward()
        opt.stash_biased()
        loss_of(model, x_lb).backward()
        opt.step()

        grads = []
        for x in (x_b, x_lb):
            ref.zero_grad()
            loss_of(ref, x).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for p, g_b, g_lb in zip(ref.parameters(), *grads):
            p.grad = (1 + beta) * g_lb - beta * g_b
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    return opt


# lr factor and beta per step of check_tensor_scalars: the values move from step to step, as an
# lr or beta schedule moves them.
SCHEDULE = [(1.0, 1.0), (0.5, 0.3), (0.125, 2.0)]


def check_tensor_scalars(op_name, device, dtype, sizes, *, scalar_dtype=torch.float64,
                         prefix="triton_"):
    """The .tensor overload, given lr, scale_b and scale_lb as tensors on the device, writes the
    same bits as the default overload given the same values as floats, over steps whose lr and
    beta change (the skip check on one of them)."""
    _, _, args, kwargs = problem_for(op_name, device, dtype, sizes, prefix=prefix)
    results = []
    for overload in ("default", "tensor"):
        op = fused_op(op_name, prefix, overload)
        call_args = copy.deepcopy(args)
        found_inf = torch.zeros((), device=device)
        for step, (lr_factor, beta) in enumerate(SCHEDULE):
            values = dict(zip(("scale_b", "scale_lb"), scales(beta, 0.5, 0.25)))
            if "lr" in kwargs:
                values["lr"] = kwargs["lr"] * lr_factor
            tensors = {name: torch.tensor(v, dtype=scalar_dtype, device=device)
                       for name, v in values.items()}
            # The floats are the tensors' values (float32 tensors round them).
            scalars = tensors if overload == "tensor" else {n: float(t) for n, t in
                                                            tensors.items()}
            op(*call_args, found_inf, **dict(kwargs, **scalars), check_finite=step == 1)
        assert found_inf.item() == 0
        results.append(call_args)
    for i, (a, b) in enumerate(zip(*results)):
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"argument {i}[{j}] differs between the overloads"
    assert any(not torch.equal(x, y) for x, y in zip(results[0][0], args[0])), \
        "the steps changed nothing"


def check_graph_follows_tensor_scalars(kind, prefix="triton_"):
    """A step of the .tensor overload captured in a CUDA graph once and replayed while lr and
    beta change: every replay reads the scalars' current values (no value is baked into the
    graph), matching the reference step by step; a replay with found_inf set changes nothing."""
    sizes = [4096, 1, 70_001, 33]
    generator = torch.Generator().manual_seed(11)
    params = random_tensors(sizes, torch.float32, "cuda", generator)
    (g_b, g_lb), = gradients(sizes, torch.float32, "cuda", generator, 1)
    if kind == "sgd":
        state = [random_tensors(sizes, torch.float32, "cuda", generator)]
        hyper = dict(SGD_HYPERS[3], is_first_step=False)
        op_name, reference = "sgd_step_", _reference.sgd_step_
    else:
        state = list(adam_state(sizes, torch.float32, "cuda", generator, True, (0, 2)))
        hyper = dict(ADAM_HYPERS[3])
        op_name, reference = "adam_step_", _reference.adam_step_
    base_lr = hyper.pop("lr")
    lr = torch.tensor(base_lr, dtype=torch.float64, device="cuda")
    scale_b = torch.zeros((), dtype=torch.float64, device="cuda")
    scale_lb = torch.zeros((), dtype=torch.float64, device="cuda")
    op = fused_op(op_name, prefix, "tensor")
    found_inf = torch.zeros((), device="cuda")

    def set_scalars(lr_factor, beta):
        values = (base_lr * lr_factor, *scales(beta))
        for tensor, value in zip((lr, scale_b, scale_lb), values):
            tensor.fill_(value)
        return dict(zip(("lr", "scale_b", "scale_lb"), values))

    def step():
        op(params, g_b, g_lb, *state, found_inf, lr=lr, scale_b=scale_b, scale_lb=scale_lb,
           **hyper, check_finite=True)

    set_scalars(*SCHEDULE[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels and fills the table caches
    torch.cuda.current_stream().wait_stream(stream)
    expected_params, expected_state = copy.deepcopy(params), copy.deepcopy(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lr_factor, beta in SCHEDULE[1:] + SCHEDULE[:1]:
        values = set_scalars(lr_factor, beta)
        graph.replay()
        reference(expected_params, g_b, g_lb, *expected_state, torch.zeros((), device="cuda"),
                  **hyper, **values, check_finite=True)
    torch.cuda.synchronize()
    for a, e in zip(params + sum(state, []), expected_params + sum(expected_state, [])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    before = copy.deepcopy(params)
    found_inf.fill_(1.0)
    graph.replay()  # skipped on the device
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def check_found_inf_of_shape_one(op_name, device, dtype, sizes, *, prefix="triton_"):
    """found_inf may be any one-element float32 tensor (GradScaler's per-device flags have shape
    (1,)): the op then gives what it gives with a 0-d found_inf, and a skip still skips."""
    op, reference, args, kwargs = problem_for(op_name, device, dtype, sizes, prefix=prefix)
    outcomes = []
    for function, found_inf in ((op, torch.zeros(1, device=device)),
                                (reference, torch.zeros((), device=device)),
                                (op, torch.ones(1, device=device))):
        call_args = copy.deepcopy(args)
        function(*call_args, found_inf, **kwargs, check_finite=True)
        outcomes.append(call_args)
    for i, (a, b) in enumerate(zip(outcomes[0], outcomes[1])):
        assert_all_close(a, b, dtype, f"argument {i}")
    for a, b in zip(outcomes[2], args):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "a skipped step changed something"


def check_capture_with_cold_tables(kind):
    """A Triton step captured before any eager call with these tensors (whole-iteration capture
    allocates gradients from the graph's pool: new addresses, no cached tables) launches per
    tensor inside the graph; its replays match the reference, and an eager call after the
    capture, before any replay, is not handed a table that only a replay would fill."""
    from gerne_kernels.triton_kernels import _launch

    sizes = [4096, 1, 70_001, 33]
    generator = torch.Generator().manual_seed(13)

    def make_state():
        if kind == "sgd":
            return [random_tensors(sizes, torch.float32, "cuda", generator)]
        return list(adam_state(sizes, torch.float32, "cuda", generator, True, (0, 2)))

    if kind == "sgd":
        hyper = dict(SGD_HYPERS[3], is_first_step=False)
        op, reference = fused_op("sgd_step_"), _reference.sgd_step_
    else:
        hyper = dict(ADAM_HYPERS[3])
        op, reference = fused_op("adam_step_"), _reference.adam_step_
    scale_b, scale_lb = scales(1.0)
    kwargs = dict(hyper, scale_b=scale_b, scale_lb=scale_lb, check_finite=True)
    # Compile the kernels on other tensors, so that only the tables are cold.
    warm = random_tensors(sizes, torch.float32, "cuda", generator)
    (warm_b, warm_lb), = gradients(sizes, torch.float32, "cuda", generator, 1)
    op(warm, warm_b, warm_lb, *make_state(), torch.zeros((), device="cuda"), **kwargs)
    params = random_tensors(sizes, torch.float32, "cuda", generator)
    (g_b, g_lb), = gradients(sizes, torch.float32, "cuda", generator, 1)
    state = make_state()
    initial = copy.deepcopy((params, state))
    found_inf = torch.zeros((), device="cuda")
    for cache in (_launch._pointer_tables, _launch._chunk_tables):
        cache.recent.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(params, g_b, g_lb, *state, found_inf, **kwargs)
    # Eager, before any replay, with the same sizes (the same chunk table key).
    eager_params, eager_state = copy.deepcopy(initial)
    op(eager_params, g_b, g_lb, *eager_state, torch.zeros((), device="cuda"), **kwargs)
    expected_params, expected_state = copy.deepcopy(initial)
    reference(expected_params, g_b, g_lb, *expected_state, torch.zeros((), device="cuda"),
              **kwargs)
    for a, e in zip(eager_params + sum(eager_state, []),
                    expected_params + sum(expected_state, [])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    expected_params, expected_state = copy.deepcopy(initial)
    for _ in range(3):
        graph.replay()
        reference(expected_params, g_b, g_lb, *expected_state, torch.zeros((), device="cuda"),
                  **kwargs)
    torch.cuda.synchronize()
    for a, e in zip(params + sum(state, []), expected_params + sum(expected_state, [])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
