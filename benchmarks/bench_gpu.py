"""Time one GERNE optimizer step on a CUDA GPU: the CUDA and Triton kernels against torch's best.

    python benchmarks/bench_gpu.py --out DIR            # table on stdout, bench_gpu.json and
                                                        # bench_gpu.md in DIR
    python benchmarks/bench_gpu.py --quick              # fewer rounds

Problem 1: 2^26 float32 parameters in 200 tensors of uneven sizes, one step of SGD with momentum
and one of AdamW on g = (1 + beta) g_lb - beta g_b. Variants:

  cuda            gerne_kernels' CUDA op (sgd_step_ / adam_step_), check_finite=False: one pass
  cuda_checked    the same with check_finite=True (GERNE's default): one more read of g_b, g_lb
  cuda_tensor_scalars  the CUDA op's .tensor overload: lr and the scales read from device memory
  triton          the Triton op (one launch for all tensors via a pointer table), check_finite=False
  triton_per_tensor  the Triton op launched once per tensor
  torch_fused     torch._foreach_lerp_(g_b, g_lb, 1 + beta) (g into g_b), then
                  torch.optim.SGD / AdamW(fused=True).step(): torch's fastest, two passes
  gerne_step      GERNE(backend="cuda"): stash_biased() + step(), the op plus Python overhead
  gerne_step_device_scalars  the same with lr and beta as device tensors (no host sync)
  reference       gerne_kernels' pure-PyTorch reference ops (the specification)

The floor: bytes that must move per float32 parameter (read once, write once): SGD momentum 24 B,
AdamW 32 B. The device-to-device copy bandwidth (dst.copy_(src) over 1 GiB, read + write bytes),
measured in the same rounds, sets the floor time; "floor" is floor time / step time.

Problem 2: many small tensors, 1,000 float32 tensors of 4,096 elements, AdamW: the CUDA and Triton
ops against torch.optim.AdamW(fused=True).step() alone (no extrapolation).

Timing: CUDA events around a batch of calls; warm-up first; the variants take turns in every
round; the median over rounds. Launches: CUDA kernels (and copies) per step under torch.profiler.

    python benchmarks/bench_gpu.py --cpu-smoke --out DIR

runs the whole script on the CPU at tiny sizes, the C++ CPU op standing in for the CUDA op
(wall-clock timing, no launch counts): it proves the script's logic where no GPU is at hand
(benchmarks/test_bench_gpu.py), so that the scarce GPU time is not lost to a Python error. Its
numbers mean nothing.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import gerne_kernels as gk
except ImportError:  # a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gerne_kernels as gk
from bench_step import BETA, BYTES_PER_PARAM, LR, MOMENTUM, WEIGHT_DECAY, scale_args  # noqa: E402

from gerne_kernels import _backends, _build, _reference  # noqa: E402

DEVICE = "cuda"   # "cpu" with --cpu-smoke
BACKEND = "cuda"  # the backend of the "cuda" rows: "cpu" with --cpu-smoke
TARGETS = dict(floor_fraction=0.85, speedup_vs_torch_fused=1.2, launches=4,
               small_tensors_vs_torch_adamw=2.0)
ADAMW = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY, amsgrad=False,
             maximize=False, decoupled_weight_decay=True)


# ------------------------------------------------------------------------------------------------
# Problems


def uneven_sizes(numel, tensors):
    """`tensors` sizes summing to numel, unequal as a model's layers are (weights 1..2, most
    sizes multiples of 64, the last one ragged)."""
    weights = [1.0 + ((i * 7919) % 101) / 100.0 for i in range(tensors)]
    total = sum(weights)
    sizes = [max(64, int(numel * w / total) // 64 * 64) for w in weights[:-1]]
    sizes.append(numel - sum(sizes))
    assert sizes[-1] > 0
    return sizes


def randn(sizes, generator, positive=False):
    out = [torch.randn(n, generator=generator, device=DEVICE) for n in sizes]
    return [t.abs_() for t in out] if positive else out


class Problem:
    """One copy of params, gradients and optimizer state on the GPU."""

    def __init__(self, sizes, seed=0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.sizes = sizes
        self.params, self.grads_b, self.grads_lb = (randn(sizes, gen) for _ in range(3))
        self.buffers = randn(sizes, gen)
        self.exp_avgs = randn(sizes, gen)
        self.exp_avg_sqs = randn(sizes, gen, positive=True)
        self.steps = [torch.ones((), device=DEVICE) for _ in sizes]
        self.found_inf = torch.zeros((), device=DEVICE)

    def op_step(self, impl, optimizer, check_finite, tensor_scalars=False):
        """A callable running impl's fused op (an Implementation or the reference module); with
        tensor_scalars, lr and the scales are float64 device tensors (the .tensor overloads)."""
        scalars = dict(scale_args(), lr=LR)
        if tensor_scalars:
            scalars = {k: torch.tensor(v, dtype=torch.float64, device=DEVICE)
                       for k, v in scalars.items()}
        if optimizer == "sgd":
            return lambda: impl.sgd_step_(
                self.params, self.grads_b, self.grads_lb, self.buffers, self.found_inf,
                momentum=MOMENTUM, dampening=0.0, nesterov=False, weight_decay=WEIGHT_DECAY,
                maximize=False, is_first_step=False, check_finite=check_finite, **scalars)
        return lambda: impl.adam_step_(
            self.params, self.grads_b, self.grads_lb, self.exp_avgs, self.exp_avg_sqs, [],
            self.steps, self.found_inf, **ADAMW, check_finite=check_finite, **scalars)

    def torch_step(self, optimizer, extrapolate=True):
        """torch.optim's fused optimizer, after torch._foreach_lerp_ forms g in g_b."""
        leaves = [torch.nn.Parameter(p) for p in self.params]
        for p, g in zip(leaves, self.grads_b):
            p.grad = g
        if optimizer == "sgd":
            opt = torch.optim.SGD(leaves, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  fused=True)
        else:
            opt = torch.optim.AdamW(leaves, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

        def step():
            if extrapolate:  # lerp(g_b, g_lb, 1 + beta) = (1 + beta) g_lb - beta g_b
                torch._foreach_lerp_(self.grads_b, self.grads_lb, 1.0 + BETA)
            opt.step()
        step()  # creates the state
        return step

    def gerne_step(self, optimizer, device_scalars=False):
        leaves = [torch.nn.Parameter(p) for p in self.params]
        hyper = dict(momentum=MOMENTUM) if optimizer == "sgd" else {}
        lr, beta = LR, BETA
        if device_scalars:  # lr and beta as device tensors: the sync-free, graph-safe path
            lr, beta = (torch.tensor(v, dtype=torch.float64, device=DEVICE) for v in (lr, beta))
        opt = gk.GERNE(leaves, optimizer=optimizer, lr=lr, weight_decay=WEIGHT_DECAY, beta=beta,
                       backend=BACKEND, **hyper)

        def step():
            for p, g in zip(leaves, self.grads_b):
                p.grad = g
            opt.stash_biased()
            for p, g in zip(leaves, self.grads_lb):
                p.grad = g
            opt.step()
        step()
        return step


def triton_impl():
    """The Triton Implementation and its launch_settings, or (None, reason)."""
    try:
        impl = _backends.implementation("triton", DEVICE, torch.float32)
        from gerne_kernels import triton_kernels
        return impl, getattr(triton_kernels, "launch_settings", None)
    except Exception as exc:  # not installed, failed import: the row says why
        return None, f"{type(exc).__name__}: {exc}"


def in_mode(settings, mode, fn):
    if settings is None:
        return fn

    def run():
        with settings(mode=mode):
            fn()
    return run


# ------------------------------------------------------------------------------------------------
# Measuring


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn, calls):
    """Milliseconds for `calls` calls: CUDA events on the GPU, the wall clock on the CPU."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_interleaved(fns, rounds, calls, warmup=3):
    """{name: median milliseconds per call}: `calls` calls timed together, all functions
    taking turns in each of `rounds` rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(elapsed_ms(fn, calls) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def launches_per_call(fn):
    """GPU activities (kernels, copies, fills) per call, counted by torch.profiler (None on the
    CPU)."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def max_error(optimizer, impl, sizes):
    """Max |op - reference| / (1 + |reference|) over the parameters after one step."""
    ours, theirs = Problem(sizes, seed=7), Problem(sizes, seed=7)
    ours.op_step(impl, optimizer, True)()
    theirs.op_step(_reference, optimizer, True)()
    return max(((a - b).abs() / (1 + b.abs())).max().item()
               for a, b in zip(ours.params, theirs.params) if a.numel())


class CopyBandwidth:
    """dst.copy_(src) over `nbytes`: read + write bytes per second."""

    def __init__(self, nbytes):
        self.numel = nbytes // 4
        self.src = torch.randn(self.numel, device=DEVICE)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)

    def gbps(self, ms):
        return 2 * 4 * self.numel / (ms * 1e-3) / 1e9


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Runs


def run_large(optimizer, numel, tensors, rounds, calls, copy_bw, triton):
    sizes = uneven_sizes(numel, tensors)
    cuda = _backends.implementation(BACKEND, DEVICE, torch.float32)
    variants, problems = {}, []

    def problem():
        problems.append(Problem(sizes, seed=len(problems)))
        return problems[-1]

    shared = problem()
    variants["cuda"] = shared.op_step(cuda, optimizer, False)
    variants["cuda_checked"] = shared.op_step(cuda, optimizer, True)
    variants["cuda_tensor_scalars"] = shared.op_step(
        _backends.implementation(BACKEND, DEVICE, torch.float32, tensor_scalars=True), optimizer,
        False, tensor_scalars=True)
    triton_impl_, settings = triton
    if triton_impl_ is not None:
        variants["triton"] = in_mode(settings, "multi_tensor",
                                     shared.op_step(triton_impl_, optimizer, False))
        if settings is not None:
            variants["triton_per_tensor"] = in_mode(settings, "per_tensor",
                                                    shared.op_step(triton_impl_, optimizer, False))
    variants["torch_fused"] = problem().torch_step(optimizer)
    variants["gerne_step"] = problem().gerne_step(optimizer)
    variants["gerne_step_device_scalars"] = problem().gerne_step(optimizer, device_scalars=True)
    variants["reference"] = problem().op_step(_reference, optimizer, False)
    ms = time_interleaved({**variants, "copy": copy_bw.step}, rounds, calls)
    bandwidth = copy_bw.gbps(ms.pop("copy"))
    floor_ms = BYTES_PER_PARAM[optimizer] * numel / (bandwidth * 1e9) * 1e3
    errors = {"cuda": max_error(optimizer, cuda, sizes[:20])}
    if triton_impl_ is not None:
        errors["triton"] = max_error(optimizer, triton_impl_, sizes[:20])
    rows = []
    for name, fn in variants.items():
        rows.append(dict(
            problem=f"{optimizer}, 2^{numel.bit_length() - 1} params in {tensors} tensors",
            optimizer=optimizer, variant=name, ms=ms[name], copy_gbps=bandwidth,
            gbps=BYTES_PER_PARAM[optimizer] * numel / (ms[name] * 1e-3) / 1e9,
            floor_fraction=floor_ms / ms[name],
            speedup_vs_torch_fused=ms["torch_fused"] / ms[name],
            launches=launches_per_call(fn), max_error=errors.get(name)))
    if triton_impl_ is None:
        rows.append(dict(optimizer=optimizer, variant="triton", skipped=settings))
    del problems, shared
    empty_cache()
    return rows


def run_small(tensors, numel, rounds, calls, triton):
    sizes = [numel] * tensors
    cuda = _backends.implementation(BACKEND, DEVICE, torch.float32)
    problems = [Problem(sizes, seed=s) for s in range(4)]
    variants = {"cuda_checked": problems[0].op_step(cuda, "adamw", True),
                "cuda": problems[0].op_step(cuda, "adamw", False),
                "torch_adamw_fused_alone": problems[1].torch_step("adamw", extrapolate=False),
                "torch_fused": problems[2].torch_step("adamw")}
    triton_impl_, settings = triton
    if triton_impl_ is not None:
        variants["triton"] = in_mode(settings, "multi_tensor",
                                     problems[3].op_step(triton_impl_, "adamw", False))
    ms = time_interleaved(variants, rounds, calls)
    base = ms["torch_adamw_fused_alone"]
    rows = [dict(problem=f"adamw, {tensors} tensors of {numel}", optimizer="adamw",
                 variant=name, ms=ms[name], vs_torch_adamw_alone=ms[name] / base,
                 launches=launches_per_call(fn)) for name, fn in variants.items()]
    del problems
    empty_cache()
    return rows


def verdicts(large, small):
    """The issue's targets, for the CUDA backend (and Triton where it ran)."""
    out = []
    for backend in ("cuda", "triton"):
        for row in large:
            if row.get("variant") != backend:
                continue
            out.append(dict(backend=backend, target=f"{row['optimizer']}: >= 85% of copy bandwidth",
                            value=f"{100 * row['floor_fraction']:.1f}%",
                            ok=row["floor_fraction"] >= TARGETS["floor_fraction"]))
            out.append(dict(backend=backend, target=f"{row['optimizer']}: >= 1.2x torch_fused",
                            value=f"{row['speedup_vs_torch_fused']:.2f}x",
                            ok=row["speedup_vs_torch_fused"] >= TARGETS["speedup_vs_torch_fused"]))
            if backend == "cuda":
                out.append(dict(backend=backend, target=f"{row['optimizer']}: <= 4 launches",
                                value=str(row["launches"]),
                                ok=row["launches"] is not None
                                and row["launches"] <= TARGETS["launches"]))
        for row in small:
            if row["variant"] == backend:
                out.append(dict(backend=backend, target=f"{row['problem']}: <= 2x torch AdamW",
                                value=f"{row['vs_torch_adamw_alone']:.2f}x",
                                ok=row["vs_torch_adamw_alone"] <= TARGETS[
                                    "small_tensors_vs_torch_adamw"]))
    return out


def auto_order(large, small):
    """backend="auto"'s order on CUDA that this run supports: the backend faster in most of the
    problems where both ran (ties to cuda), with the count; None when Triton did not run."""
    times = {}
    for row in large + small:
        if row.get("variant") in ("cuda", "triton") and "ms" in row:
            times.setdefault(row["problem"], {})[row["variant"]] = row["ms"]
    both = [t for t in times.values() if len(t) == 2]
    if not both:
        return None
    triton_wins = sum(t["triton"] < t["cuda"] for t in both)
    order = ("triton", "cuda") if triton_wins > len(both) - triton_wins else ("cuda", "triton")
    return dict(order=order, faster_first=max(triton_wins, len(both) - triton_wins),
                problems=len(both))


def markdown(meta, large, small, checks):
    lines = [f"GPU check {meta['date']}: {meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}", "",
             f"Device-to-device copy: {large[0]['copy_gbps']:.0f} GB/s (read + write).", "",
             "| problem | variant | ms/step | GB/s (floor bytes) | floor | vs torch_fused | "
             "launches |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in large:
        if "ms" in r:
            lines.append(f"| {r['problem']} | {r['variant']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                         f"{100 * r['floor_fraction']:.1f}% | {r['speedup_vs_torch_fused']:.2f}x "
                         f"| {r['launches']} |")
    lines += ["", "| problem | variant | ms/step | vs torch AdamW(fused) alone | launches |",
              "|---|---|---:|---:|---:|"]
    for r in small:
        lines.append(f"| {r['problem']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['vs_torch_adamw_alone']:.2f}x | {r['launches']} |")
    lines += ["", "| backend | target | measured | met |", "|---|---|---:|---|"]
    for c in checks:
        lines.append(f"| {c['backend']} | {c['target']} | {c['value']} | "
                     f"{'yes' if c['ok'] else 'NO'} |")
    order = auto_order(large, small)
    if order is not None:
        lines += ["", f"backend=\"auto\" on CUDA, by this run: {' then '.join(order['order'])} "
                      f"({order['order'][0]} faster in {order['faster_first']} of "
                      f"{order['problems']} problems; _backends.AUTO_ORDER holds the order)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--numel-log2", type=int, default=26)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--small-tensors", type=int, default=1000)
    parser.add_argument("--small-numel", type=int, default=4096)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the script's logic on the CPU at tiny sizes (no GPU needed; "
                             "the numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.numel_log2, args.tensors = min(args.numel_log2, 14), min(args.tensors, 20)
        args.small_tensors, args.small_numel = min(args.small_tensors, 30), 256
    return args


def main(argv=None):
    global DEVICE, BACKEND
    args = parse_args(argv)
    DEVICE = BACKEND = "cpu" if args.cpu_smoke else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible; nothing to measure "
              "(--cpu-smoke checks the script on the CPU)")
        return 2
    built = _build.build(BACKEND)
    if not built.ok:
        print(f"bench_gpu: the {BACKEND} extension failed to build: {built.error} "
              f"(log: {built.log_path})")
        return 1
    rounds, calls = (7, 5) if args.quick else (15, 10)
    if args.cpu_smoke:
        rounds, calls = 2, 1
    triton = triton_impl()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run (not a GPU)"
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                gpu=gpu, torch=torch.__version__,
                cuda=torch.version.cuda, triton=_version("triton"),
                numel=1 << args.numel_log2, tensors=args.tensors, rounds=rounds, calls=calls,
                build_seconds=built.seconds, triton_status="ok" if triton[0] else triton[1])
    copy_bw = CopyBandwidth(1 << (20 if args.cpu_smoke else 30))
    large = []
    for optimizer in ("sgd", "adamw"):
        large += run_large(optimizer, 1 << args.numel_log2, args.tensors, rounds, calls, copy_bw,
                           triton)
    small = run_small(args.small_tensors, args.small_numel, rounds, calls, triton)
    checks = verdicts([r for r in large if "ms" in r], small)
    report = markdown(meta, [r for r in large if "ms" in r], small, checks)
    print(report)
    if triton[0] is None:
        print(f"triton: skipped ({triton[1]})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump(dict(meta=meta, large=large, small=small, targets=checks), f, indent=1)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write(report)
    return 0


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
