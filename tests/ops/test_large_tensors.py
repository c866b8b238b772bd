"""Tensors of more than 2^31 elements: the kernels index with 64-bit integers, so every element
is reached, correctly, and (on the CPU) without hidden full-size temporaries.

Values are dyadic rationals with few bits, so that float32 arithmetic and the bfloat16 result
are exact and the expected values follow from the formulas with no rounding at all: windows at
the start, around index 2^31 and at the end carry an index-dependent pattern (a wrapped 32-bit
index would read or write the wrong element), the rest a constant that every element must reach
(an index that stopped early would leave it unchanged).

On the CPU (the cpu backend), one bfloat16 step (scan_, then SGD without momentum) on
N = 2^31 + 2^20 + 37 elements holds the parameter and the two gradients, 3 * 2 bytes * N =
12 GiB: it runs only where GERNE_KERNELS_BIG_TESTS=1 and /proc/meminfo's MemAvailable exceeds
14 GiB (about 30 s on 2 cores, most of it first-touching the 12 GiB). On a GPU (cuda, triton),
where 16 GiB are free.
"""

import os

import pytest
import torch

import harness

N = 2**31 + 2**20 + 37   # past 2^31, with a scalar tail after the last SIMD block
WINDOW = 4096
LR, SCALE_B, SCALE_LB = 0.5, -1.0, 2.0  # beta = 1: g = 2 g_lb - g_b
P_FILL, GB_FILL, GLB_FILL = 1.0, 0.5, 0.75  # -> 1 - 0.5 * (1.5 - 0.5) = 0.5
SGD = dict(lr=LR, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
           maximize=False, is_first_step=False, scale_b=SCALE_B, scale_lb=SCALE_LB)


def mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def require_room(backend):
    """Skips unless the backend's device has room for three N-element bfloat16 tensors."""
    if backend.device == "cuda":
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
        if free_gib < 16:
            pytest.skip(f"needs 16 GiB of free GPU memory, {free_gib:.1f} free")
        return
    if os.environ.get("GERNE_KERNELS_BIG_TESTS") != "1":
        pytest.skip("12 GiB test: set GERNE_KERNELS_BIG_TESTS=1 to run it")
    if mem_available_gib() < 14:
        pytest.skip(f"needs 14 GiB of available memory, {mem_available_gib():.1f} free")


def peak_rss_reset():
    """Resets the process's peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def windows():
    return [(0, WINDOW), (2**31 - WINDOW, 2**31 + WINDOW), (N - WINDOW, N)]


def pattern(begin, end):
    """(p, g_b, g_lb) in float64 for indices [begin, end): multiples of 1/8, 1/4 and 1/16."""
    i = torch.arange(begin, end, dtype=torch.int64)
    return (i % 64).double() / 8, (i * 3 % 16).double() / 4, (i * 7 % 32).double() / 16


def expected_update(p, g_b, g_lb):
    return p - LR * (SCALE_LB * g_lb + SCALE_B * g_b)


def make_tensors(device):
    p, g_b, g_lb = (torch.empty(N, dtype=torch.bfloat16, device=device).fill_(value)
                    for value in (P_FILL, GB_FILL, GLB_FILL))
    for begin, end in windows():
        for tensor, values in zip((p, g_b, g_lb), pattern(begin, end)):
            tensor[begin:end] = values.to(torch.bfloat16)
    return p, g_b, g_lb


def scan_and_step(backend, p, g_b, g_lb, found_inf):
    backend.op("scan_")([g_b], [g_lb], found_inf, None, scale_b=SCALE_B, scale_lb=SCALE_LB)
    backend.op("sgd_step_")([p], [g_b], [g_lb], [], found_inf, **SGD)


def outside_windows_all_equal(p, value):
    """True if every element outside the windows equals value: the min and the max of the bit
    patterns (an int16 view, which reduces ~20x faster than a bf16 comparison) are value's."""
    bits = int(torch.tensor(value, dtype=torch.bfloat16).view(torch.int16))
    edges = [0] + [x for w in windows() for x in w] + [N]
    for begin, end in zip(edges[0::2], edges[1::2]):
        if begin == end:
            continue
        low, high = torch.aminmax(p[begin:end].view(torch.int16))
        if not int(low) == int(high) == bits:
            return False
    return True


@harness.over_backends(["cpu", "cuda", "triton"])
def test_bf16_scan_and_sgd_step_on_more_than_2_31_elements(backend):
    if backend.interpreted:
        pytest.skip("the interpreter would take hours over 2^31 elements")
    require_room(backend)
    p, g_b, g_lb = make_tensors(backend.device)

    # An inf beyond index 2^31 must be found by scan_: the step changes nothing.
    bad = 2**31 + 2**19
    g_lb[bad] = float("inf")
    found_inf = torch.zeros((), device=backend.device)
    scan_and_step(backend, p, g_b, g_lb, found_inf)
    assert float(found_inf) == 1.0
    assert outside_windows_all_equal(p, P_FILL)
    for begin, end in windows():
        assert torch.equal(p[begin:end].double().cpu(), pattern(begin, end)[0])
    g_lb[bad] = GLB_FILL

    # The real step; on the CPU without a full-size temporary (a bf16 copy alone would add
    # 4 GiB to the peak).
    found_inf = torch.zeros((), device=backend.device)
    on_cpu = backend.device == "cpu"
    if on_cpu:
        peak_rss_reset()
        rss_before = rss_kib("VmRSS")
    scan_and_step(backend, p, g_b, g_lb, found_inf)
    assert float(found_inf) == 0.0
    if on_cpu:
        growth_mib = (rss_kib("VmHWM") - rss_before) / 1024
        assert growth_mib < 256, f"the step's peak memory grew by {growth_mib:.0f} MiB"

    for begin, end in windows():
        p0, gb0, glb0 = pattern(begin, end)
        expected = expected_update(p0, gb0, glb0)
        assert torch.equal(expected.to(torch.bfloat16).double(), expected)  # exact in bf16
        assert torch.equal(p[begin:end].double().cpu(), expected), (begin, end)
    assert outside_windows_all_equal(p, expected_update(P_FILL, GB_FILL, GLB_FILL))


@harness.on_gpu()
def test_scan_sums_over_more_than_2_31_elements_are_exact(backend):
    """g_b = 0.5 and g_lb = 0.75 everywhere, g = 2 g_lb - g_b = 1: the float64 sums of the N
    squares and products are N, N/4, 9N/16 and 3N/8 exactly (each partial sum a multiple of
    1/16 below 2^53): one element missed or read twice would show."""
    require_room(backend)
    g_b = torch.full((N,), GB_FILL, dtype=torch.bfloat16, device=backend.device)
    g_lb = torch.full((N,), GLB_FILL, dtype=torch.bfloat16, device=backend.device)
    sums = torch.zeros(4, dtype=torch.float64, device=backend.device)
    found_inf = torch.zeros((), device=backend.device)
    backend.op("scan_")([g_b], [g_lb], found_inf, sums, scale_b=SCALE_B, scale_lb=SCALE_LB)
    assert float(found_inf) == 0.0
    assert sums.tolist() == [float(N), N / 4, 9 * N / 16, 3 * N / 8]


@harness.on_gpu()
def test_float16_sgd_step_over_2_31_elements_matches_the_reference(backend):
    """float16 SGD on one tensor of 2^31 + 4099 random elements (12 GiB for p, g_b, g_lb): the
    elements around 2^31 and at the end match the reference on slices."""
    require_room(backend)
    huge = (1 << 31) + 4099  # with a ragged last chunk
    gen = torch.Generator(device=backend.device).manual_seed(11)
    p, g_b, g_lb = (torch.randn(huge, generator=gen, device=backend.device, dtype=torch.float16)
                    for _ in range(3))
    parts = [slice(0, 4096), slice((1 << 31) - 2048, (1 << 31) + 2048),
             slice(huge - 70000, huge)]
    before = [p[w].clone() for w in parts]
    hyper = dict(SGD, weight_decay=0.01, lr=0.1)
    found_inf = torch.zeros((), device=backend.device)
    backend.op("sgd_step_")([p], [g_b], [g_lb], [], found_inf, **hyper)
    assert float(found_inf) == 0.0
    for part, start in zip(parts, before):
        expected = [start.clone()]
        harness.reference_op("sgd_step_")(expected, [g_b[part]], [g_lb[part]], [],
                                          torch.zeros((), device=backend.device), **hyper)
        harness.assert_all_close([p[part]], expected, f"params[{part}]")


@harness.on_gpu()
def test_extrapolate_over_2_31_elements(backend):
    """64-bit offsets: extrapolate over 2^31 + 5 bfloat16 elements (about 13 GB in all)."""
    require_room(backend)
    n = 2 ** 31 + 5
    g_b = torch.full((n,), 1.0, dtype=torch.bfloat16, device=backend.device)
    g_lb = torch.full((n,), 2.0, dtype=torch.bfloat16, device=backend.device)
    g_b[-3:] = torch.tensor([3.0, 4.0, 5.0], dtype=torch.bfloat16)
    out = torch.zeros_like(g_lb)
    backend.op("extrapolate_")([out], [g_b], [g_lb], torch.zeros((), device=backend.device),
                               scale_b=-1.0, scale_lb=2.0)
    assert out[0].item() == 3.0 and out[2 ** 31 - 1].item() == 3.0
    assert out[-3:].tolist() == [1.0, 0.0, -1.0]
