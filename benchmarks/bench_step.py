"""Time one GERNE optimizer step on the CPU: the fused kernel against what torch alone offers.

    python benchmarks/bench_step.py                       # full run: table, sweeps, JSON, plot
    python benchmarks/bench_step.py --quick               # a minute: fewer sizes and repeats
    python benchmarks/bench_step.py --json out.json --plot out.png --sizes 16,20,24 --counts 1,50

One step forms g = (1 + beta) g_lb - beta g_b from the two batches' gradients and applies SGD with
momentum or AdamW to the float32 parameters. The variants:

  reference      gerne_kernels' pure-PyTorch reference ops (the specification): per tensor,
                 several torch ops and passes over memory.
  torch_fused    the strongest torch-only alternative: torch._foreach_lerp_(g_b, g_lb, 1 + beta)
                 writes g into g_b (lerp(g_b, g_lb, w) = g_b + w (g_lb - g_b)
                 = (1 + beta) g_lb - beta g_b), then torch.optim.SGD / AdamW(fused=True) steps
                 with grad = g_b. Two passes over memory.
  torch_fused_checked
                 the same with GERNE's guarantee that an inf/NaN in either gradient changes
                 nothing, as torch offers it: GradScaler's check
                 (torch._amp_foreach_non_finite_check_and_unscale_, reads and rewrites each
                 gradient: 16 B) over g_b and g_lb, then the lerp, then the fused optimizer with
                 found_inf set. The fair baseline for fused_checked and gerne_step.
  fused          gerne_kernels' C++ op (sgd_step_ / adam_step_) called directly with
                 check_finite=False: one pass.
  fused_checked  the same op with check_finite=True, as GERNE calls it by default: it first
                 scans g_b and g_lb for inf/NaN, one more read of both gradients.
  gerne_step     GERNE(backend="cpu"): stash_biased() and step(), the op plus the optimizer's
                 Python overhead (gathering tensors and state).
  gerne_step_tensor_scalars
                 the same with lr and beta as tensors (the ops' .tensor overloads: the scalars
                 are formed with torch ops, as on a GPU where this keeps the step sync-free).

The floor. Bytes that must move per float32 parameter in one step (read once, written once):
  SGD momentum: read p, g_b, g_lb, buf (16 B), write p, buf (8 B)             = 24 B
  AdamW:        read p, g_b, g_lb, m, v (20 B), write p, m, v (12 B)           = 32 B
(torch_fused moves 12 B more for its lerp pass: read g_b, g_lb, write g_b; torch_fused_checked
16 B more again for its check; fused_checked 8 B more for its scan.) The floor time is those bytes divided by the memory bandwidth, measured in the
same run with the same threads as the best of three STREAM-like in-place torch kernels over
arrays four times the last-level cache: a += b (add_), a += w (b - a) (lerp_) and a += s b c
(addcmul_). In-place kernels have the read-modify-write pattern of an optimizer step (no
write-allocate traffic); more concurrent streams reach a higher bandwidth on this machine, hence
the best of three. They take turns with the variants at every point, so they see the same
conditions. A triad (a = b + s c) and a copy are measured once at the start, for context. GB/s
below is the floor's bytes over the measured time, so that variants compare on the same work;
"floor" is floor time / measured time (above 100% where the problem fits in the caches).

Timing: every variant runs on its own copy of the tensors; warm-up runs first, then the variants
take turns (interleaved) for --repeats rounds, each round timing enough calls to last a few
milliseconds, and the median of the rounds is reported.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

try:
    import gerne_kernels as gk
except ImportError:  # run from a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gerne_kernels as gk
from gerne_kernels import _build, _ops, _reference

BETA = 1.0
LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2
BYTES_PER_PARAM = {"sgd": 24, "adamw": 32}
EXTRA_BYTES = {"reference": None, "torch_fused": 12, "torch_fused_checked": 28, "fused": 0,
               "fused_checked": 8, "gerne_step": 8, "gerne_step_tensor_scalars": 8}
VARIANTS = ("reference", "torch_fused", "torch_fused_checked", "fused", "fused_checked",
            "gerne_step", "gerne_step_tensor_scalars")
OPTIMIZERS = ("sgd", "adamw")
MIN_SAMPLE_SECONDS = 0.004


# ------------------------------------------------------------------------------------------------
# Problems


def split_sizes(numel, tensors):
    """`tensors` sizes summing to numel, as even as possible (a model's layers are not all equal,
    but the total is what the floor depends on)."""
    tensors = max(1, min(tensors, numel))
    base, extra = divmod(numel, tensors)
    return [base + (1 if i < extra else 0) for i in range(tensors)]


def random_tensors(sizes, positive=False):
    out = [torch.randn(size) for size in sizes]
    return [t.abs_() for t in out] if positive else out


def scale_args():
    return dict(scale_b=-BETA, scale_lb=1.0 + BETA)


def make_step(optimizer, variant, numel, tensors):
    """A zero-argument callable that performs one step of `variant` on a fresh problem."""
    sizes = split_sizes(numel, tensors)
    params, grads_b, grads_lb = random_tensors(sizes), random_tensors(sizes), random_tensors(sizes)
    found_inf = torch.zeros(())
    if variant in ("reference", "fused", "fused_checked"):
        check = variant != "fused"
        if variant == "reference":
            sgd_step, adam_step = _reference.sgd_step_, _reference.adam_step_
        else:
            sgd_step, adam_step = _ops.op("sgd_step_"), _ops.op("adam_step_")
        if optimizer == "sgd":
            buffers = random_tensors(sizes)

            def step():
                sgd_step(params, grads_b, grads_lb, buffers, found_inf, lr=LR, momentum=MOMENTUM,
                         dampening=0.0, nesterov=False, weight_decay=WEIGHT_DECAY,
                         maximize=False, is_first_step=False, check_finite=check, **scale_args())
        else:
            exp_avgs, exp_avg_sqs = random_tensors(sizes), random_tensors(sizes, positive=True)
            steps = [torch.tensor(1.0) for _ in sizes]

            def step():
                adam_step(params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, [], steps, found_inf,
                          lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY,
                          amsgrad=False, maximize=False, decoupled_weight_decay=True,
                          check_finite=check, **scale_args())
        return step
    leaves = [torch.nn.Parameter(p) for p in params]
    if variant in ("torch_fused", "torch_fused_checked"):
        if optimizer == "sgd":
            opt = torch.optim.SGD(leaves, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  fused=True)
        else:
            opt = torch.optim.AdamW(leaves, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        for p, g_b in zip(leaves, grads_b):
            p.grad = g_b

        if variant == "torch_fused":
            def step():
                torch._foreach_lerp_(grads_b, grads_lb, 1.0 + BETA)  # g_b <- g, in place
                opt.step()
        else:
            one = torch.ones(())
            opt.found_inf = found_inf  # torch's fused optimizers skip the update when set

            def step():
                found_inf.zero_()
                torch._amp_foreach_non_finite_check_and_unscale_(grads_b, found_inf, one)
                torch._amp_foreach_non_finite_check_and_unscale_(grads_lb, found_inf, one)
                torch._foreach_lerp_(grads_b, grads_lb, 1.0 + BETA)
                opt.step()
    elif variant in ("gerne_step", "gerne_step_tensor_scalars"):
        hyper = (dict(momentum=MOMENTUM) if optimizer == "sgd" else {})
        lr, beta = LR, BETA
        if variant == "gerne_step_tensor_scalars":
            lr, beta = torch.tensor(LR, dtype=torch.float64), torch.tensor(BETA, dtype=torch.float64)
        opt = gk.GERNE(leaves, optimizer=optimizer, lr=lr, weight_decay=WEIGHT_DECAY, beta=beta,
                       backend="cpu", **hyper)

        def step():
            for p, g_b in zip(leaves, grads_b):
                p.grad = g_b
            opt.stash_biased()
            for p, g_lb in zip(leaves, grads_lb):
                p.grad = g_lb
            opt.step()
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    step()  # creates optimizer state (momentum buffers, moments), as in the second step on
    return step


# ------------------------------------------------------------------------------------------------
# Timing


def calls_per_sample(fn):
    """How many calls make one timing sample last at least MIN_SAMPLE_SECONDS."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / once))


def time_interleaved(fns, repeats, warmup=2):
    """{name: [seconds per call in each round]}, the functions taking turns in every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    counts = {name: calls_per_sample(fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / counts[name])
    return samples


class Bandwidth:
    """Effective memory bandwidth (GB/s) of STREAM-like torch kernels over float32 arrays of
    `numel` elements (the default, 2^25, is four times a 32 MiB last-level cache)."""

    def __init__(self, numel=1 << 25):
        self.numel = numel
        a, b, c = torch.randn(numel), torch.randn(numel), torch.randn(numel)
        # (kernel, bytes per element). The read-modify-write kernels have the access pattern of
        # an optimizer step (state read and written in place, no write-allocate traffic) and are
        # timed beside the variants at every point; the others only once, for context.
        self.rmw = {
            "add_ (a += b; 12 B/elem)": (lambda: a.add_(b), 12),
            "lerp_ (a += w (b - a); 12 B/elem)": (lambda: a.lerp_(b, 0.5), 12),
            "addcmul_ (a += s b c; 16 B/elem)": (lambda: a.addcmul_(b, c, value=1e-3), 16),
        }
        self.other = {
            "triad (a = b + s c; 12 B/elem)": (lambda: torch.add(b, c, alpha=0.5, out=a), 12),
            "copy_ (a = b; 8 B/elem)": (lambda: a.copy_(b), 8),
        }

    def gbps(self, samples):
        """{kernel: GB/s} from {kernel: [seconds per call in each round]} (median)."""
        kernels = {**self.rmw, **self.other}
        return {name: kernels[name][1] * self.numel / statistics.median(values) / 1e9
                for name, values in samples.items() if name in kernels}

    def measure_all(self, repeats):
        kernels = {**self.rmw, **self.other}
        return self.gbps(time_interleaved({name: fn for name, (fn, _) in kernels.items()},
                                          repeats))


# ------------------------------------------------------------------------------------------------
# Runs


def run_point(optimizer, numel, tensors, variants, repeats, bandwidth):
    """Times the variants and the bandwidth kernel in interleaved rounds; one row per variant."""
    steps = {variant: make_step(optimizer, variant, numel, tensors) for variant in variants}
    rmw = {name: fn for name, (fn, _) in bandwidth.rmw.items()}
    samples = time_interleaved({**steps, **rmw}, repeats)
    gbps = max(bandwidth.gbps({name: samples.pop(name) for name in rmw}).values())
    seconds = {variant: statistics.median(values) for variant, values in samples.items()}
    floor_bytes = BYTES_PER_PARAM[optimizer] * numel
    floor_seconds = floor_bytes / (gbps * 1e9)
    rows = []
    for variant in variants:
        row = dict(optimizer=optimizer, variant=variant, numel=numel,
                   tensors=len(split_sizes(numel, tensors)), ms=seconds[variant] * 1e3,
                   ms_min=min(samples[variant]) * 1e3, gbps=floor_bytes / seconds[variant] / 1e9,
                   bandwidth_gbps=gbps, floor_ms=floor_seconds * 1e3,
                   floor_fraction=floor_seconds / seconds[variant])
        if "torch_fused" in seconds:
            row["speedup_vs_torch_fused"] = seconds["torch_fused"] / seconds[variant]
        if "torch_fused_checked" in seconds:
            row["speedup_vs_torch_fused_checked"] = (seconds["torch_fused_checked"]
                                                     / seconds[variant])
        rows.append(row)
    return rows


def machine_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def format_row(row):
    speedup = row.get("speedup_vs_torch_fused")
    checked = row.get("speedup_vs_torch_fused_checked")
    return (f"{row['optimizer']:6} {row['variant']:25} {row['numel']:>10} {row['tensors']:>7} "
            f"{row['ms']:10.3f} {row['ms_min']:9.3f} {row['gbps']:7.2f} "
            f"{row['bandwidth_gbps']:7.2f} {100 * row['floor_fraction']:6.1f}% "
            f"{'' if speedup is None else f'{speedup:8.2f}x'}"
            f"{'' if checked is None else f'{checked:11.2f}x'}")


HEADER = (f"{'optim':6} {'variant':25} {'params':>10} {'tensors':>7} {'ms/step':>10} "
          f"{'ms(min)':>9} {'GB/s':>7} {'bw GB/s':>7} {'floor':>7} {'vs torch':>9} "
          f"{'vs checked':>11}\n"
          "(ms/step: median of rounds; GB/s: the floor's bytes / ms/step; bw: the best in-place "
          "kernel timed in the same rounds; floor: floor time / ms/step, over 100% when the "
          "problem fits in cache)")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for col, optimizer in enumerate(OPTIMIZERS):
        for row, (key, sweep, label) in enumerate((("numel", "size_sweep", "parameters"),
                                                   ("tensors", "count_sweep", "tensors"))):
            ax = axes[row][col]
            points = [r for r in results[sweep] if r["optimizer"] == optimizer]
            for variant in VARIANTS:
                mine = sorted((r[key], r["ms"]) for r in points if r["variant"] == variant)
                if mine:
                    ax.plot(*zip(*mine), marker="o", label=variant)
            floor = sorted({(r[key], r["floor_ms"]) for r in points if r["variant"] == "fused"})
            if floor:
                ax.plot(*zip(*floor), linestyle="--", color="black", label="bandwidth floor")
            ax.set_xscale("log", base=2 if key == "numel" else 10)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("ms per step")
            fixed = (f"{results['count_sweep_numel']} params" if key == "tensors"
                     else f"~{results['size_sweep_tensors']} tensors")
            ax.set_title(f"{optimizer}: ms per step vs {label} ({fixed})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"GERNE step, float32, {results['machine']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes, tensor counts and repeats (about a minute)")
    parser.add_argument("--numel-log2", type=int, default=24,
                        help="log2 of the parameter count of the main table (default 24)")
    parser.add_argument("--tensors", type=int, default=50,
                        help="tensors in the main table and the size sweep (default 50)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated log2 sizes for the size sweep (default 12,14,...,24)")
    parser.add_argument("--counts", default=None,
                        help="comma-separated tensor counts for the count sweep "
                             "(default 1,10,50,200,1000)")
    parser.add_argument("--no-sweeps", action="store_true",
                        help="only the main table (2^numel-log2 parameters, --tensors tensors)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing rounds per point (default 15, quick 5)")
    parser.add_argument("--bandwidth-log2", type=int, default=25,
                        help="log2 of the float32 elements per array of the bandwidth kernels "
                             "(default 25: 128 MiB, four times a 32 MiB last-level cache)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    parser.add_argument("--plot", default=None, help="draw the sweeps into this PNG file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    built = _build.build("cpu")
    if not built.ok:
        sys.exit(f"the cpu extension failed to build: {built.error} (log: {built.log_path})")
    repeats = args.repeats or (5 if args.quick else 15)
    default_sizes = "16,20,24" if args.quick else "12,14,16,18,20,22,24"
    default_counts = "1,50,1000" if args.quick else "1,10,50,200,1000"
    sizes = [] if args.no_sweeps else [1 << int(s) for s in (args.sizes or default_sizes).split(",")]
    counts = [] if args.no_sweeps else [int(c) for c in (args.counts or default_counts).split(",")]
    numel = 1 << args.numel_log2

    load_start = os.getloadavg()
    bandwidth = Bandwidth(1 << args.bandwidth_log2)
    bandwidths = bandwidth.measure_all(repeats)
    results = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_name(),
        threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), command=" ".join([os.path.basename(sys.argv[0])] +
                                                         sys.argv[1:]),
        beta=BETA, bytes_per_param=BYTES_PER_PARAM, extra_bytes_per_param=EXTRA_BYTES,
        bandwidth_kernels_gbps=bandwidths, load_average_start=load_start,
        size_sweep_tensors=args.tensors, count_sweep_numel=numel)
    print(f"machine: {results['machine']}, {results['threads']} threads, torch {torch.__version__}")
    for name, gbps in bandwidths.items():
        print(f"bandwidth {name}: {gbps:.2f} GB/s")
    print("the floor's bandwidth is the best in-place kernel (add_, lerp_, addcmul_: the "
          "read-modify-write pattern of a step), timed again at every point; bytes that must "
          "move per float32 parameter: SGD momentum "
          f"{BYTES_PER_PARAM['sgd']} (read p, g_b, g_lb, buf; write p, buf), AdamW "
          f"{BYTES_PER_PARAM['adamw']} (read p, g_b, g_lb, m, v; write p, m, v)")
    if load_start[0] > (os.cpu_count() or 1):
        print(f"WARNING: load average {load_start[0]:.1f} on {os.cpu_count()} CPUs: other "
              "processes compete for the cores and memory bus; timings are noisy")

    print(f"\nmain: 2^{args.numel_log2} parameters in {args.tensors} tensors\n{HEADER}")
    results["main"] = []
    for optimizer in OPTIMIZERS:
        rows = run_point(optimizer, numel, args.tensors, VARIANTS, repeats, bandwidth)
        results["main"] += rows
        for row in rows:
            print(format_row(row))

    sweep_variants = [v for v in VARIANTS if v != "reference"] if args.quick else VARIANTS
    if sizes:
        print(f"\nsize sweep: {args.tensors} tensors (fewer when smaller than that)\n{HEADER}")
    results["size_sweep"] = []
    for optimizer in OPTIMIZERS:
        for size in sizes:
            rows = run_point(optimizer, size, args.tensors, sweep_variants, repeats, bandwidth)
            results["size_sweep"] += rows
            for row in rows:
                print(format_row(row))

    if counts:
        print(f"\ntensor-count sweep: 2^{args.numel_log2} parameters\n{HEADER}")
    results["count_sweep"] = []
    for optimizer in OPTIMIZERS:
        for count in counts:
            rows = run_point(optimizer, numel, count, sweep_variants, repeats, bandwidth)
            results["count_sweep"] += rows
            for row in rows:
                print(format_row(row))

    results["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot and results["size_sweep"] and results["count_sweep"]:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
