"""The CPU kernels index with 64-bit integers: a tensor of more than 2^31 elements is updated
everywhere, correctly, and without hidden full-size temporaries.

One bfloat16 SGD step without momentum on N = 2^31 + 2^20 + 37 elements holds the parameter and
the two gradients, 3 * 2 bytes * N = 12 GiB. The test runs only where GERNE_KERNELS_BIG_TESTS=1
and /proc/meminfo's MemAvailable exceeds 14 GiB; it takes about 30 s on 2 cores, most of it
first-touching the 12 GiB.

Values are dyadic rationals with few bits, so that the kernel's float32 arithmetic and the
bfloat16 result are exact and the expected values follow from the formula
    p <- p - lr * (scale_lb * g_lb + scale_b * g_b)
with no rounding at all: windows at the start, around index 2^31 and at the end carry an
index-dependent pattern (a wrapped 32-bit index would read or write the wrong element), the rest
a constant that every element must reach (an index that stopped early would leave it unchanged).
"""

import os

import pytest
import torch

from gerne_kernels import _backends, _ops

N = 2**31 + 2**20 + 37   # past 2^31, with a scalar tail after the last SIMD block
WINDOW = 4096
LR, SCALE_B, SCALE_LB = 0.5, -1.0, 2.0  # beta = 1: g = 2 g_lb - g_b


def mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


pytestmark = [
    pytest.mark.skipif(os.environ.get("GERNE_KERNELS_BIG_TESTS") != "1",
                       reason="12 GiB test: set GERNE_KERNELS_BIG_TESTS=1 to run it"),
    pytest.mark.skipif(mem_available_gib() < 14,
                       reason=f"needs 14 GiB of available memory, {mem_available_gib():.1f} free"),
]


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


P_FILL, GB_FILL, GLB_FILL = 1.0, 0.5, 0.75  # -> 1 - 0.5 * (1.5 - 0.5) = 0.5


def make_tensors():
    p = torch.empty(N, dtype=torch.bfloat16).fill_(P_FILL)
    g_b = torch.empty(N, dtype=torch.bfloat16).fill_(GB_FILL)
    g_lb = torch.empty(N, dtype=torch.bfloat16).fill_(GLB_FILL)
    for begin, end in windows():
        for tensor, values in zip((p, g_b, g_lb), pattern(begin, end)):
            tensor[begin:end] = values.to(torch.bfloat16)
    return p, g_b, g_lb


def sgd_step(p, g_b, g_lb, found_inf):
    _ops.op("sgd_step_")([p], [g_b], [g_lb], [], found_inf, lr=LR, momentum=0.0,
                         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                         is_first_step=False, scale_b=SCALE_B, scale_lb=SCALE_LB,
                         check_finite=True)


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


def test_bf16_sgd_step_on_more_than_2_31_elements():
    if not _backends.status("cpu")[0]:
        pytest.skip(f"cpu backend unavailable: {_backends.status('cpu')[1]}")
    p, g_b, g_lb = make_tensors()

    # An inf beyond index 2^31 must be found by the finite scan: the step changes nothing.
    bad = 2**31 + 2**19
    g_lb[bad] = float("inf")
    found_inf = torch.zeros(())
    sgd_step(p, g_b, g_lb, found_inf)
    assert float(found_inf) == 1.0
    assert outside_windows_all_equal(p, P_FILL)
    for begin, end in windows():
        assert torch.equal(p[begin:end].double(), pattern(begin, end)[0])
    g_lb[bad] = GLB_FILL

    # The real step: no full-size temporary (a bf16 copy alone would add 4 GiB to the peak).
    found_inf = torch.zeros(())
    peak_rss_reset()
    rss_before = rss_kib("VmRSS")
    sgd_step(p, g_b, g_lb, found_inf)
    growth_mib = (rss_kib("VmHWM") - rss_before) / 1024
    assert float(found_inf) == 0.0
    assert growth_mib < 256, f"the step's peak memory grew by {growth_mib:.0f} MiB"

    for begin, end in windows():
        p0, gb0, glb0 = pattern(begin, end)
        expected = expected_update(p0, gb0, glb0)
        assert torch.equal(expected.to(torch.bfloat16).double(), expected)  # exact in bf16
        assert torch.equal(p[begin:end].double(), expected), (begin, end)
    assert outside_windows_all_equal(p, expected_update(P_FILL, GB_FILL, GLB_FILL))
