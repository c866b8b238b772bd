"""CPU throughput of the update ops: this tree against an older build, in alternating processes.

    python3 benchmarks/tools/bench_cpu_update_ops.py /tmp/gerne-old [--rounds 5] [--repeats 15]
        [--threads N] [--clock wall|cpu]

Each round runs one process per build (old, then new, alternating, so that a busy spell on a
shared machine hits both); a process times each op on 2^24 float32 parameters in 50 tensors
(median of --repeats calls after a warm-up): sgd_step_ (momentum 0.9, weight decay), adam_step_
(AdamW), extrapolate_, and, new only, lion_step_ and scan_ (without and with sums). Printed: the
median over rounds of each build's medians, in ms, and new / old; in brackets the fastest call
of each build and their ratio (the least disturbed measure on a busy machine). On a machine shared with
others, wall time includes the waits for a core; --clock cpu times the CPU time the process got
instead (time.process_time, all its threads), which such waits do not inflate.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

NEW_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUMEL, TENSORS = 1 << 24, 50


def sizes():
    base, extra = divmod(NUMEL, TENSORS)
    return [base + (1 if i < extra else 0) for i in range(TENSORS)]


def child(tree, old, repeats, threads, clock):
    sys.path.insert(0, tree)
    if threads:
        torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    from gerne_kernels import _build, _ops  # noqa: F401  (defines the schemas)
    assert _build.build("cpu").ok
    ops = torch.ops.gerne_kernels
    gen = torch.Generator().manual_seed(0)
    new = lambda: [torch.randn(n, generator=gen) for n in sizes()]
    p, g_b, g_lb, m, v = new(), new(), new(), new(), [t.abs() for t in new()]
    found = torch.zeros(())
    steps = [torch.zeros(()) for _ in p]
    extra = dict(check_finite=False) if old else {}
    scales = dict(scale_b=-0.7, scale_lb=1.7)
    calls = {
        "sgd_step_": lambda: ops.sgd_step_(p, g_b, g_lb, m, found, lr=1e-3, momentum=0.9,
                                           dampening=0.0, nesterov=False, weight_decay=1e-4,
                                           maximize=False, is_first_step=False, **scales,
                                           **extra),
        "adam_step_": lambda: ops.adam_step_(p, g_b, g_lb, m, v, [], steps, found, lr=1e-3,
                                             beta1=0.9, beta2=0.999, eps=1e-8,
                                             weight_decay=1e-2, amsgrad=False, maximize=False,
                                             decoupled_weight_decay=True, **scales, **extra),
        "extrapolate_": lambda: ops.extrapolate_(m, g_b, g_lb, found, **scales, **extra),
    }
    if not old:
        sums = torch.zeros(4, dtype=torch.float64)
        calls["lion_step_"] = lambda: ops.lion_step_(p, g_b, g_lb, m, found, lr=1e-4, beta1=0.9,
                                                     beta2=0.99, weight_decay=0.1,
                                                     maximize=False, **scales)
        calls["scan_ (flag)"] = lambda: ops.scan_(g_b, g_lb, found, None, **scales)
        calls["scan_ (sums)"] = lambda: ops.scan_(g_b, g_lb, found, sums, **scales)
    times = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        samples = []
        for _ in range(repeats):
            start = now()
            call()
            samples.append(now() - start)
        times[name] = (statistics.median(samples) * 1e3, min(samples) * 1e3)
    print("RESULT " + json.dumps(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old_tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    results = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, tree in (("old", args.old_tree), ("new", NEW_TREE)):
            env = dict(os.environ)
            cache = os.environ.get("GERNE_KERNELS_CACHE_" + label.upper())
            if cache:
                env["GERNE_KERNELS_CACHE"] = cache
            out = subprocess.run([sys.executable, __file__, "--child", tree, label,
                                  str(args.repeats), str(args.threads), args.clock], env=env, cwd=tree, capture_output=True,
                                 text=True, check=True).stdout
            results[label].append(json.loads(out.split("RESULT ", 1)[1]))
    print(f"2^24 float32 parameters in {TENSORS} tensors, "
          f"{args.threads or torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.rounds} rounds x {args.repeats} calls (ms)")
    print("  (median over rounds of each round's median; in brackets the fastest call of all)")
    for name in results["new"][0]:
        new = statistics.median(r[name][0] for r in results["new"])
        new_min = min(r[name][1] for r in results["new"])
        if name in results["old"][0]:
            old = statistics.median(r[name][0] for r in results["old"])
            old_min = min(r[name][1] for r in results["old"])
            ratios = [n[name][0] / o[name][0] for n, o in zip(results["new"], results["old"])]
            print(f"  {name:14s} old {old:7.2f} [{old_min:6.2f}]   new {new:7.2f} [{new_min:6.2f}]"
                  f"   new/old {new / old:5.2f} [{new_min / old_min:4.2f}]   per round: "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}")
        else:
            print(f"  {name:14s}                        new {new:7.2f} [{new_min:6.2f}]")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "old", int(sys.argv[4]), int(sys.argv[5]),
              sys.argv[6])
    else:
        main()
