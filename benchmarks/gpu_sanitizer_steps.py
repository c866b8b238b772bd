"""One small call of every op on the GPU backends, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitizer_steps.py [cuda|triton]

Ragged sizes (an empty tensor, sizes that end mid-vector and mid-chunk, a tensor over one chunk)
and a misaligned view (t[1:] of a float32 tensor, so the scalar path runs beside the vector
path), in float32 and bfloat16, both overloads; scan_ with and without sums and with g_b alone.
Each result is compared with the reference, so a silent wrong value fails here too. Exits 0 when
every call ran and matched.
"""

import sys

import torch

from gerne_kernels import _backends, _ops, _reference

SIZES = [0, 1, 5, 1023, 4099, 70001]


def tensors(dtype, seed, positive=False, misaligned=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for i, n in enumerate(SIZES):
        t = torch.randn(n + 1, generator=gen, device="cuda").to(dtype)
        t = t.abs() if positive else t
        out.append(t[1:] if misaligned and i == 3 else t[:n])
    return out


def arguments(name, dtype, overload):
    """(args, kwargs) of one call of op ``name``."""
    def scalar(value):
        return (torch.tensor(value, dtype=torch.float64, device="cuda") if overload == "tensor"
                else value)

    scales = dict(scale_b=scalar(-1.5), scale_lb=scalar(2.5))
    params, g_b, g_lb = tensors(dtype, 1), tensors(dtype, 2), tensors(dtype, 3)
    found = torch.zeros((), device="cuda")
    if name == "sgd_step_":
        return ((params, g_b, g_lb, tensors(dtype, 4), found),
                dict(lr=scalar(0.1), momentum=0.9, dampening=0.0, nesterov=True,
                     weight_decay=0.01, maximize=False, is_first_step=False, **scales))
    if name == "adam_step_":
        steps = [torch.full((), 3.0, device="cuda") for _ in SIZES]
        return ((params, g_b, g_lb, tensors(dtype, 4), tensors(dtype, 5, True),
                 tensors(dtype, 6, True), steps, found),
                dict(lr=scalar(1e-3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                     amsgrad=True, maximize=False, decoupled_weight_decay=True, **scales))
    if name == "lion_step_":
        return ((params, g_b, g_lb, tensors(dtype, 4), found),
                dict(lr=scalar(1e-4), beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
                     **scales))
    if name == "extrapolate_":
        return (tensors(dtype, 7), g_b, g_lb, found), scales
    sums = torch.zeros(4, dtype=torch.float64, device="cuda")
    return (g_b, g_lb, found, sums), scales


def clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    return value


def flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    return []


def main(backend):
    failures = 0
    for spec in _ops.OPS:
        for dtype in (torch.float32, torch.bfloat16):
            for overload in _ops.OVERLOADS:
                args, kwargs = arguments(spec.name, dtype, overload)
                expected = clone(args)
                impl = _backends.implementation(backend, "cuda", dtype, overload == "tensor")
                impl.op(spec.name)(*args, **kwargs)
                getattr(_reference, spec.name)(*expected, **kwargs)
                torch.cuda.synchronize()
                worst = max((((a.float() - b.float()).abs() / (1 + b.float().abs())).max().item()
                             for a, b in zip(flat(args), flat(expected)) if a.numel()),
                            default=0.0)
                ok = worst < (1e-5 if dtype == torch.float32 else 2e-2)
                failures += not ok
                print(f"{backend} {spec.name} {dtype} {overload}: max rel. error {worst:.2e} "
                      f"{'ok' if ok else 'MISMATCH'}", flush=True)
    print(f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
