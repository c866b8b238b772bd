"""The CPU update ops of this tree against those of an older build, bit for bit.

    mkdir -p /tmp/gerne-old && git -C . archive 21f56e8 | tar -x -C /tmp/gerne-old
    python3 benchmarks/tools/compare_with_old_build.py /tmp/gerne-old

Both trees register the same op names, so each runs in a process of its own, on the same inputs
(saved once by this process): sgd_step_, adam_step_ and extrapolate_ for float32, bfloat16 and
float16, several hyperparameter sets, ragged sizes (single elements to several work items, so
that the SIMD body, the scalar tails and the parallel pass all run), three consecutive steps, and
both overloads (.tensor with float32 and float64 scalars). The old build is called with
check_finite=False. Every output tensor must be equal bit for bit to the old build's for the
same overload, and the .tensor overload's with float64 scalars to the .default overload's (torch.equal on the raw bits,
so that -0.0 != 0.0 and NaN == NaN). Exit status 0 when all are equal.
"""

import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NEW_TREE = os.path.dirname(os.path.dirname(HERE))
SHAPES = [(1,), (7,), (33,), (64,), (100, 3), (1000,), (4097,), (65541,), (3, 70001)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEPS = 3
SGD = [dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
       dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False),
       dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True),
       dict(momentum=0.8, dampening=0.25, nesterov=False, weight_decay=5e-4, maximize=False)]
ADAM = [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
             decoupled_weight_decay=False),
        dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=False, maximize=False,
             decoupled_weight_decay=False),
        dict(beta1=0.8, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
             decoupled_weight_decay=True),
        dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05, amsgrad=True, maximize=True,
             decoupled_weight_decay=True)]
SCALARS = dict(lr=0.0123, scale_b=-0.7, scale_lb=1.7)
OVERLOADS = ("default", "tensor32", "tensor64")


def make_inputs():
    gen = torch.Generator().manual_seed(1234)
    cases = []
    for dtype in DTYPES:
        def tensors(scale=1.0, positive=False):
            out = [(torch.randn(s, generator=gen) * scale).to(dtype) for s in SHAPES]
            return [t.abs() for t in out] if positive else out
        for i, hyper in enumerate(SGD):
            cases.append(dict(op="sgd_step_", name=f"sgd{i}-{dtype}", hyper=hyper,
                              params=tensors(), grads_b=tensors(), grads_lb=tensors(),
                              state=[tensors()]))
        for i, hyper in enumerate(ADAM):
            cases.append(dict(op="adam_step_", name=f"adam{i}-{dtype}", hyper=hyper,
                              params=tensors(), grads_b=tensors(), grads_lb=tensors(),
                              state=[tensors(0.1), tensors(0.01, True), tensors(0.02, True)]))
        cases.append(dict(op="extrapolate_", name=f"extrapolate-{dtype}", hyper={},
                          params=tensors(), grads_b=tensors(), grads_lb=tensors(), state=[]))
        cases.append(dict(op="extrapolate_", name=f"extrapolate-aliased-{dtype}", hyper={},
                          params=None, grads_b=tensors(), grads_lb=tensors(), state=[]))
    return cases


def scalars(overload):
    if overload == "default":
        return dict(SCALARS)
    dtype = torch.float32 if overload == "tensor32" else torch.float64
    return {k: torch.tensor(v, dtype=dtype) for k, v in SCALARS.items()}


def run_case(ops, case, overload, old):
    """The case's tensors after STEPS calls (fresh clones per overload)."""
    clone = lambda ts: [t.clone() for t in ts]
    extra = dict(check_finite=False) if old else {}
    g_b, g_lb = clone(case["grads_b"]), clone(case["grads_lb"])
    s = scalars(overload)
    found_inf = torch.zeros(())
    overload_name = "default" if overload == "default" else "tensor"
    op = getattr(getattr(ops, case["op"]), overload_name)
    if case["op"] == "sgd_step_":
        p, buf = clone(case["params"]), clone(case["state"][0])
        for step in range(STEPS):
            op(p, g_b, g_lb, buf, found_inf, is_first_step=step == 0, **case["hyper"], **s,
               **extra)
        return p + buf
    if case["op"] == "adam_step_":
        p, m, v, vmax = clone(case["params"]), *(clone(t) for t in case["state"])
        steps = [torch.zeros(()) for _ in p]
        for _ in range(STEPS):
            op(p, g_b, g_lb, m, v, vmax, steps, found_inf, **case["hyper"], **s, **extra)
        return p + m + v + vmax + steps
    out = g_lb if case["params"] is None else clone(case["params"])
    s.pop("lr")
    for _ in range(STEPS):
        op(out, g_b, g_lb, found_inf, **s, **extra)
    return out + g_b + g_lb


def child(tree, inputs_path, outputs_path, old):
    sys.path.insert(0, tree)
    from gerne_kernels import _build, _ops  # noqa: F401  (defines the schemas)
    built = _build.build("cpu")
    assert built.ok, built.error
    ops = torch.ops.gerne_kernels
    cases = torch.load(inputs_path)
    results = {}
    for case in cases:
        for overload in OVERLOADS:
            results[(case["name"], overload)] = run_case(ops, case, overload, old)
    torch.save(results, outputs_path)


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype,
                                                                                torch.int16))


def main(old_tree):
    work = tempfile.mkdtemp(prefix="gerne-compare-")
    inputs = os.path.join(work, "inputs.pt")
    torch.save(make_inputs(), inputs)
    outputs = {}
    for label, tree in (("old", old_tree), ("new", NEW_TREE)):
        env = dict(os.environ, GERNE_KERNELS_CACHE=os.environ.get(
            "GERNE_KERNELS_CACHE_" + label.upper(), os.path.join(work, f"cache-{label}")))
        out = os.path.join(work, f"{label}.pt")
        subprocess.run([sys.executable, __file__, "--child", tree, inputs, out, label],
                       check=True, env=env, cwd=tree)
        outputs[label] = torch.load(out)
    mismatches, compared = [], 0
    for key, old in outputs["old"].items():
        pairs = [("new", outputs["new"][key])]
        if key[1] == "tensor64":  # float64 scalars hold the floats exactly: .default's results
            pairs.append(("new .default", outputs["new"][(key[0], "default")]))
        for label, other in pairs:
            for i, (a, b) in enumerate(zip(old, other)):
                compared += 1
                if not torch.equal(bits(a), bits(b)):
                    mismatches.append(f"{key} vs {label}: tensor {i} of shape {tuple(a.shape)}")
    print(f"compared {compared} tensors ({len(outputs['old'])} case x overload runs, "
          f"{sum(t.numel() for ts in outputs['old'].values() for t in ts)} elements): "
          f"{len(mismatches)} differ")
    for line in mismatches[:20]:
        print("  " + line)
    return 1 if mismatches else 0


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "old")
    else:
        sys.exit(main(sys.argv[1]))
