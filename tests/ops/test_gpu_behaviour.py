"""The GPU backends (cuda, and triton on CUDA tensors) as a training loop drives them; skipped
without a GPU. A step is scan_ (when the inf/NaN check or the sums are wanted) and then the
update op; both read their scalars and found_inf on the device, so:

- no call synchronises with the host (lr and the scales as floats, as device tensors, or as CPU
  tensors, which the host reads without a device sync), and the three give the same bits;
- a call over 200 tensors is a bounded number of kernel launches (LAUNCHES);
- a step captured in a CUDA graph replays like eager steps, bit for bit (Adam's step counts
  advance on the device; found_inf is read at replay time: a NaN skips the replay), follows
  device lr and beta moved between replays, and may be captured before any eager call with its
  tensors (a whole-step capture allocates the gradients anew);
- a GERNE step captured whole replays like eager GERNE steps;
- a call on a second GPU runs there (the ops launch on found_inf's device).
"""

import contextlib

import pytest
import torch

import gerne_kernels as gk
import harness

OPS = harness.OP_NAMES
UPDATE_OPS = harness.UPDATE_OPS
# Kernel launches of one call over 200 tensors: one pass for sgd_step_, lion_step_ and
# extrapolate_; Adam's step counts, then its update; scan_'s pass, then the reduction of its
# sums. A default Adam step (scan_ with sums, then adam_step_) is then at most four.
LAUNCHES = {"sgd_step_": 1, "adam_step_": 2, "lion_step_": 1, "extrapolate_": 1, "scan_": 2}
DEFAULT_STEP_LAUNCHES = 4


def test_every_op_has_a_launch_budget():
    assert set(LAUNCHES) == set(OPS)


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def scalar_arguments(problem, place, device):
    """(overrides, tensor_scalars): lr / scale_b / scale_lb as floats (place "floats"), or as
    float64 tensors on the device ("device_tensors") or on the host ("host_tensors")."""
    if place == "floats":
        return {}, False
    where = device if place == "device_tensors" else "cpu"
    return {name: torch.tensor(float(problem.scalars[name]), dtype=torch.float64, device=where)
            for name in ("lr", "scale_b", "scale_lb") if name in problem.scalars}, True


def scan_then(problem, update_op, scan_op, sums, step=None):
    """One step as the optimizer runs it: scan_ into found_inf (and sums), then the update."""
    scan_op(problem.tensors["grads_b"], problem.tensors["grads_lb"], problem.tensors["found_inf"],
            sums, scale_b=problem.scalars["scale_b"], scale_lb=problem.scalars["scale_lb"])
    problem.call(update_op, step)


def assert_same_written(actual, expected, what):
    for name, value in expected.written().items():
        harness.assert_bitwise_equal(actual.tensors[name], value, f"{what} {name}")


@harness.on_gpu()
@pytest.mark.parametrize("place", ["floats", "device_tensors", "host_tensors"])
@pytest.mark.parametrize("op_name", OPS)
def test_a_call_never_syncs_with_the_host(backend, op_name, place):
    """Two calls (the first compiles and fills caches; the second runs under the sync check)
    give the bits of two calls with float scalars."""
    problem = harness.build(op_name, backend, shapes=[(3000,)] * 20, steps=2, mid_training=True)
    floats = problem.copy()
    for step in range(2):
        floats.use_step(step).call(backend.op(op_name), step)
    overrides, tensor_scalars = scalar_arguments(problem, place, backend.device)
    op = backend.op(op_name, tensor_scalars)
    problem.call(op, 0, **overrides)
    problem.use_step(1)
    with no_host_sync():
        problem.call(op, 1, **overrides)
    torch.cuda.synchronize()
    assert_same_written(problem, floats, f"{place}:")


def count_kernel_launches(fn):
    """(kernels launched by fn, their names); fn runs once before, unprofiled (lazy
    initialisation, compilation and table caches must not count). Copies are not launches."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels), sorted(set(kernels))


@harness.on_gpu()
@pytest.mark.parametrize("op_name", OPS)
def test_launches_per_call_of_200_tensors(backend, op_name):
    problem = harness.build(op_name, backend, shapes=[(4096,)] * 200, mid_training=True)
    launches, names = count_kernel_launches(lambda: problem.call(backend.op(op_name)))
    assert launches <= LAUNCHES[op_name], names


@harness.on_gpu()
def test_a_default_adam_step_of_200_tensors_is_at_most_four_launches(backend):
    problem = harness.build("adam_step_", backend, shapes=[(4096,)] * 200)
    sums = torch.zeros(4, dtype=torch.float64, device=backend.device)
    launches, names = count_kernel_launches(
        lambda: scan_then(problem, backend.op("adam_step_"), backend.op("scan_"), sums))
    assert launches <= DEFAULT_STEP_LAUNCHES, names


CAPTURE_SHAPES = [(64, 33), (33,), (1000, 7), (5,), (70001,)]


def warm_up_on_a_side_stream(fn):
    """torch's capture recipe: eager iterations on a side stream before torch.cuda.graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


@harness.on_gpu()
@pytest.mark.parametrize("op_name", UPDATE_OPS)
def test_a_captured_step_replays_like_eager_steps(backend, op_name):
    """scan_ with sums, then the update, captured once and replayed three times with new
    gradients copied into the captured ones == the same steps run eagerly, bit for bit (sums
    included); then a replay with found_inf set on entry, and one with a NaN gradient, change
    none of the update's tensors, and the NaN sets found_inf."""
    steps = 4
    # Mid-training (no first SGD step): the captured call is the variant the warm-up launched.
    problem = harness.build(op_name, backend, shapes=CAPTURE_SHAPES, steps=steps,
                            mid_training=True)
    scan, update = backend.op("scan_"), backend.op(op_name)
    eager, graphed = problem.copy(), problem.copy()
    eager_sums, graphed_sums = (torch.zeros(4, dtype=torch.float64, device=backend.device)
                                for _ in range(2))
    scan_then(eager, update, scan, eager_sums, step=0)
    warm_up_on_a_side_stream(lambda: scan_then(graphed, update, scan, graphed_sums, step=0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scan_then(graphed, update, scan, graphed_sums)
    static = graphed.tensors

    def load(step):
        for name in ("grads_b", "grads_lb"):
            for buffer, new in zip(static[name], getattr(problem.gradients[step], name)):
                buffer.copy_(new)

    for step in range(1, steps):
        load(step)
        static["found_inf"].zero_()
        graph.replay()
        eager.use_step(step)
        eager.tensors["found_inf"].zero_()
        scan_then(eager, update, scan, eager_sums)
    torch.cuda.synchronize()
    assert_same_written(graphed, eager, "replay:")
    harness.assert_bitwise_equal(graphed_sums, eager_sums, "sums")
    if "state_steps" in static:
        assert [float(s) for s in static["state_steps"]] == [
            float(s) + steps for s in problem.tensors["state_steps"]]

    before = graphed.copy()
    static["found_inf"].fill_(1.0)
    graph.replay()  # found_inf read at replay time: skipped
    load(steps - 1)
    static["found_inf"].zero_()
    static["grads_lb"][0].view(-1)[7] = float("nan")
    graph.replay()  # scan_ flags the NaN: skipped
    torch.cuda.synchronize()
    assert float(static["found_inf"]) == 1.0
    harness.assert_unchanged(graphed, before, problem.signature.written - {"found_inf"})


@harness.on_gpu()
@pytest.mark.parametrize("op_name", UPDATE_OPS)
def test_a_captured_step_follows_device_lr_and_beta(backend, op_name):
    """The .tensor overload captured once with lr, scale_b and scale_lb in device tensors,
    replayed while a schedule moves them: each replay reads their current values (none is
    baked into the graph) and matches the oracle's step with those values; a replay with
    found_inf set changes nothing."""
    schedule = [(0.5, 0.3), (0.125, 2.0), (1.0, 1.0)]
    problem = harness.build(op_name, backend, shapes=[(4096,), (1,), (70001,), (33,)],
                            mid_training=True)
    base_lr = problem.scalars.get("lr")
    scalars = {name: torch.zeros((), dtype=torch.float64, device=backend.device)
               for name in ("lr", "scale_b", "scale_lb") if name in problem.scalars}

    def move_to(lr_factor, beta):
        values = dict(zip(("scale_b", "scale_lb"), harness.scales(beta)))
        if base_lr is not None:
            values["lr"] = base_lr * lr_factor
        for name, value in values.items():
            scalars[name].fill_(value)
        return values

    op = backend.op(op_name, tensor_scalars=True)
    move_to(1.0, 1.0)
    warm_up_on_a_side_stream(lambda: problem.copy().call(op, **scalars))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        problem.call(op, **scalars)
    for lr_factor, beta in schedule:
        values = move_to(lr_factor, beta)
        before = problem.copy()
        before.scalars.update(values)
        expected = harness.oracle_problem(backend, problem)
        graph.replay()
        expected.call(harness.reference_op(op_name), **values)
        torch.cuda.synchronize()
        harness.compare_step(problem, expected, before, what=f"lr x{lr_factor}, beta {beta}: ")
    before = problem.copy()
    problem.tensors["found_inf"].fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    harness.assert_unchanged(problem, before, problem.signature.written)


@harness.on_gpu()
@pytest.mark.parametrize("op_name", OPS)
def test_capture_before_any_eager_call_with_its_tensors(backend, op_name):
    """Captured with tensors no eager call has seen (a whole-step capture allocates gradients
    from the graph's pool: new addresses, nothing cached for them), after an eager call on
    other tensors of the same shapes (which compiles the kernels): an eager call after the
    capture, before any replay, is correct (it is handed nothing that only a replay fills),
    and three replays match three of the oracle's steps."""
    problem = harness.build(op_name, backend, shapes=[(4096,), (1,), (70001,), (33,)],
                            mid_training=True)
    problem.copy().call(backend.op(op_name))  # compiles, on other tensors
    captured = problem.copy()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.call(backend.op(op_name))
    eager = problem.copy()
    expected = harness.oracle_problem(backend, problem)
    eager.call(backend.op(op_name))
    expected.call(harness.reference_op(op_name))
    harness.compare_step(eager, expected, problem, what="eager after the capture: ")
    expected = harness.oracle_problem(backend, problem)
    for _ in range(3):
        graph.replay()
        expected.call(harness.reference_op(op_name))
    torch.cuda.synchronize()
    for name, value in captured.written().items():
        if name == "sums":
            harness.assert_sums_close(value, expected.tensors[name])
        elif name in ("found_inf", "state_steps"):
            harness.assert_bitwise_equal(value, expected.tensors[name], name)
        else:
            harness.assert_all_close(value, expected.tensors[name], f"after 3 replays: {name}")


@harness.on_gpu()
@pytest.mark.parametrize("kind,hyper", [
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("lion", dict(lr=1e-3, weight_decay=0.1)),
])
def test_a_captured_gerne_step_replays_like_eager_steps(backend, kind, hyper):
    """A whole GERNE step (stash, the scan_ for skip_nonfinite, the fused update, the skip
    counter) captured in a CUDA graph and replayed, against the same steps run eagerly."""
    device = backend.device
    gen = torch.Generator(device=device).manual_seed(5)
    shapes = [(64, 33), (33,), (1000, 7), (5,)]
    start = [torch.randn(s, generator=gen, device=device) for s in shapes]
    grads = [([torch.randn(s, generator=gen, device=device) for s in shapes],
              [torch.randn(s, generator=gen, device=device) for s in shapes]) for _ in range(6)]

    def make():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        return params, gk.GERNE(params, optimizer=kind, beta=2.0, backend=backend.name,
                                skip_nonfinite=True, **hyper)

    def gerne_step(params, opt, g_b, g_lb):
        for p, g in zip(params, g_b):
            p.grad = g.clone()
        opt.stash_biased()
        for p, g in zip(params, g_lb):
            p.grad = g.clone()
        opt.step()

    eager_params, eager_opt = make()
    graph_params, graph_opt = make()
    static_b = [torch.zeros_like(t) for t in start]
    static_lb = [torch.zeros_like(t) for t in start]
    # Two warm-up steps: the first creates the state (and may read the device once), the
    # second launches the kernels that the captured step launches (SGD's first step differs).
    warm_up = grads[:2]
    warm_up_on_a_side_stream(lambda: [gerne_step(graph_params, graph_opt, *g) for g in warm_up])
    for g_b, g_lb in warm_up:
        gerne_step(eager_params, eager_opt, g_b, g_lb)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, g in zip(graph_params, static_b):
            p.grad = g
        graph_opt.stash_biased()
        for p, g in zip(graph_params, static_lb):
            p.grad = g
        graph_opt.step()
    for g_b, g_lb in grads[len(warm_up):]:
        for static, new in zip(static_b + static_lb, g_b + g_lb):
            static.copy_(new)
        graph.replay()
        gerne_step(eager_params, eager_opt, g_b, g_lb)
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(graph_params, eager_params):
        for key, value in eager_opt.state[b].items():
            if torch.is_tensor(value) and key != "grad_b":
                assert torch.equal(graph_opt.state[a][key], value), key


@harness.on_gpu()
@pytest.mark.parametrize("op_name", OPS)
def test_a_call_on_the_second_gpu_runs_there(backend, op_name):
    """Tensors on cuda:1 while cuda:0 is current: the op launches on found_inf's device and
    matches the oracle."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    problem = harness.build(op_name, "cuda:1", shapes=[(4096,), (3,), (70001,)])
    before = problem.copy()
    expected = harness.oracle_problem(backend, problem)
    with torch.cuda.device(0):
        problem.call(backend.op(op_name), step=0)
    expected.call(harness.reference_op(op_name), step=0)
    harness.compare_step(problem, expected, before)
