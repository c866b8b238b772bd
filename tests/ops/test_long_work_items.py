"""The CPU harness cuts large problems (at least 64 x 2^18 elements) into longer work items
(csrc/cpu/multi_tensor_cpu.h). The update is element-wise, so every element must come out
bit-identical to the same tensors updated in calls small enough for the short items, and the
scan's sums must be the float64 sums of its terms (within float64 rounding) and the same on
every call. Ragged sizes put item boundaries inside tensors and leave scalar tails."""

import torch

import harness

LONG_ITEM = 1 << 18
SIZES = (LONG_ITEM * 40 + 37, LONG_ITEM * 24 + 5, 3)  # 64 long items and more, in all
HYPER = dict(lr=0.01, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01,
             maximize=False, is_first_step=False, scale_b=-1.5, scale_lb=2.5)


def tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in SIZES]


@harness.over_backends(["cpu"])
def test_long_items_update_every_element_as_short_items_do(backend):
    op = backend.op("sgd_step_")
    p, g_b, g_lb, buf = tensors(1), tensors(2), tensors(3), tensors(4)
    found_inf = torch.zeros(())
    whole = [t.clone() for t in p], [t.clone() for t in buf]
    op(whole[0], g_b, g_lb, whole[1], found_inf, **HYPER)         # one call: long items
    for i in range(len(SIZES)):                                    # one tensor a call: short
        op([p[i]], [g_b[i]], [g_lb[i]], [buf[i]], found_inf, **HYPER)
    assert sum(SIZES) >= 64 * LONG_ITEM > max(SIZES)
    for a, b in zip(whole[0] + whole[1], p + buf):
        assert torch.equal(a, b)
    assert not torch.equal(whole[0][0], tensors(1)[0])  # it did update


@harness.over_backends(["cpu"])
def test_long_items_scan_sums_are_float64_sums(backend):
    scan = backend.op("scan_")
    g_b, g_lb = tensors(5), tensors(6)
    sums = []
    for _ in range(2):
        found_inf, total = torch.zeros(()), torch.zeros(4, dtype=torch.float64)
        scan(g_b, g_lb, found_inf, total, scale_b=-1.5, scale_lb=2.5)
        assert float(found_inf) == 0.0
        sums.append(total)
    assert torch.equal(sums[0], sums[1])  # the same bits: the items do not depend on timing
    b = torch.cat(g_b).double()
    lb = torch.cat(g_lb).double()
    g = 2.5 * lb - 1.5 * b  # the kernel forms g in float32: within rtol of this
    expected = torch.stack([g.square().sum(), b.square().sum(), lb.square().sum(),
                            (b * lb).sum()])
    torch.testing.assert_close(sums[0], expected, rtol=1e-6, atol=0.0)
