"""Stash, memory-lean and one-backward modes: peak memory and step time; the cost of
track_statistics.

    python benchmarks/bench_modes.py                       # CPU, 4 x Linear(2048, 2048)
    python benchmarks/bench_modes.py --device cuda --width 4096 --depth 8

A training step is: forward + backward of the biased batch, stash_biased() (stash mode), forward
+ backward of the less-biased batch, step(); the lean mode instead runs backward_biased() and
backward_less_biased(); the one-backward mode one forward of both batches concatenated and one
backward of opt.extrapolated_loss(loss_b, loss_lb). The model is a stack of square Linear layers, so parameters, gradients
and optimizer state dominate memory, as in large models; activations are small.

Every configuration runs in fresh subprocesses. Peak memory is what training adds above the
setup (model, inputs): on CUDA torch.cuda.max_memory_allocated minus the allocation after setup;
on the CPU the process's peak resident set (ru_maxrss) minus its resident set after setup, in a
run where glibc serves every allocation above 64 KiB with its own mmap and unmaps it when freed
(MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live tensors instead of malloc's
cache. Times come from a separate run with the default allocator: medians over the timed steps;
"opt.step" is opt.step() alone, "full step" includes both forwards and backwards.
"""

import os

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = [  # (mode, optimizer, track_statistics)
    ("stash", "sgd", False),
    ("lean", "sgd", False),
    ("one-backward", "sgd", False),
    ("stash", "sgd", True),
    ("stash", "adamw", False),
    ("lean", "adamw", False),
    ("one-backward", "adamw", False),
    ("stash", "adamw", True),
    ("stash", "wrapper-adamw", False),
]


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args, mode, optimizer, track_statistics):
    import gerne_kernels as gk

    device = torch.device(args.device)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.depth):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).to(device)
    x_b = torch.randn(args.batch, args.width, device=device)
    x_lb = torch.randn(args.batch, args.width, device=device)
    common = dict(beta=1.0, backend=args.backend, track_statistics=track_statistics)
    if optimizer == "sgd":
        opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=1e-3, momentum=0.9, **common)
    elif optimizer == "adamw":
        opt = gk.GERNE(model.parameters(), optimizer="adamw", lr=1e-4, **common)
    else:
        opt = gk.GERNEWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4), **common)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        base = rss_mb()
    step_times, full_times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        if mode == "stash":
            model(x_b).square().mean().backward()
            opt.stash_biased()
            model(x_lb).square().mean().backward()
        elif mode == "lean":
            opt.backward_biased(model(x_b).square().mean())
            opt.backward_less_biased(model(x_lb).square().mean())
        else:
            out_b, out_lb = model(torch.cat([x_b, x_lb])).chunk(2)
            opt.extrapolated_loss(out_b.square().mean(), out_lb.square().mean()).backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_times.append(t2 - t1)
            full_times.append(t2 - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 - base
    else:
        peak = peak_rss_mb() - base
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    return dict(mode=mode, optimizer=optimizer, statistics=track_statistics,
                peak_extra_mb=round(peak, 1), params_mb=round(params_mb, 1),
                full_step_ms=round(1e3 * statistics.median(full_times), 2),
                opt_step_ms=round(1e3 * statistics.median(step_times), 2))


def run_one(argv, config, env):
    out = subprocess.run([sys.executable, __file__, *argv, "--one", json.dumps(config)],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args, *json.loads(args.one))))
        return
    rows = []
    for config in CONFIGS:
        row = run_one(sys.argv[1:], config, os.environ)
        if args.device == "cpu":
            exact_rss = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            row["peak_extra_mb"] = run_one(sys.argv[1:] + ["--steps", "2"], config,
                                           exact_rss)["peak_extra_mb"]
        rows.append(row)
    print(f"device {args.device}, {args.depth} x Linear({args.width}, {args.width}), batch "
          f"{args.batch}, parameters {rows[0]['params_mb']} MB, median of {args.steps} steps")
    print(f"{'mode':12} {'optimizer':14} {'stats':5} {'peak extra MB':>13} {'full step ms':>12} "
          f"{'opt.step ms':>11}")
    for r in rows:
        print(f"{r['mode']:12} {r['optimizer']:14} {str(r['statistics']):5} "
              f"{r['peak_extra_mb']:13.1f} {r['full_step_ms']:12.2f} {r['opt_step_ms']:11.2f}")


if __name__ == "__main__":
    main()
