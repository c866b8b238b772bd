"""Peak memory of a GERNE step on the CPU: parameters, two gradients, optimizer state, and what
else, if anything, a step allocates.

    python benchmarks/bench_memory.py                  # 2^25 parameters in 8 tensors
    python benchmarks/bench_memory.py --numel 26 --json memory.json

What a stash-mode training step must hold, P being the bytes of the parameters:
    parameters P, g_b P (the stash), g_lb P (.grad), optimizer state
    (SGD with momentum: P; Adam/AdamW: 2P, amsgrad 3P; SGD without momentum: 0)
so 3P + state. Anything above that during the step is a hidden temporary.

Two measurements, each configuration in a fresh subprocess:

* Peak resident memory (the OS's view). Right before a call the process's peak resident set
  (VmHWM in /proc/self/status) is reset to the current one by writing 5 to /proc/self/clear_refs;
  right after it, VmHWM - VmRSS(before) is the most memory the call had in use at once on top of
  what already existed. glibc is told to serve every allocation above 64 KiB with its own mmap
  and to unmap it when freed (MALLOC_MMAP_THRESHOLD_=65536), so the resident set follows the live
  tensors instead of malloc's cache. "footprint" is the peak over a whole training step
  (zero_grad, a backward's g_b, stash_biased, a backward's g_lb, step) above the process before
  the parameters existed, next to 3P + state.
* Bytes torch allocated during a steady step in all, freed again or not (torch.profiler with
  profile_memory=True: the sum of the events' positive self memory). Zero means the step made no
  tensor at all; the resident-set peak says how much of it was alive at once.

Steps measured: the first step (it creates the optimizer state: its peak should be the state and
nothing more), a steady step (nothing should be allocated beyond a few scalars), and
stash_biased() (it moves .grad aside: nothing).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2.0 ** 20
CONFIGS = [  # (label, optimizer kwargs, state tensors per parameter)
    ("sgd", dict(optimizer="sgd", lr=0.01), 0),
    ("sgd-momentum", dict(optimizer="sgd", lr=0.01, momentum=0.9), 1),
    ("adamw", dict(optimizer="adamw", lr=1e-3), 2),
    ("adamw-amsgrad", dict(optimizer="adamw", lr=1e-3, amsgrad=True), 3),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "mixed": None}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_above(fn):
    """(bytes of the call's peak resident set above the resident set before it)."""
    _reset_peak()
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def torch_allocated(fn):
    """Bytes torch allocated during fn in all (freed or not), from the profiler's memory
    records: the sum of the events' positive self memory (an op's allocations, its children's
    excluded). A total, not a peak: the peak is the resident-set measurement's job."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


def worker(label, backend, dtype_name, numel, tensors):
    """Runs in a subprocess: one configuration, printed as one JSON line."""
    sys.path.insert(0, REPO)
    import gerne_kernels as gk

    kwargs, state_per_param = next((k, s) for name, k, s in CONFIGS if name == label)
    if backend != "reference":
        from gerne_kernels import _backends
        ok, reason, _ = _backends.status(backend)
        if not ok:
            return {"error": f"{backend} backend unavailable: {reason}"}
    # Warm-up on a tiny parameter: the first optimizer and step import and initialise parts of
    # torch (about 150 MiB resident here) that belong to no step.
    tiny = torch.nn.Parameter(torch.zeros(64))
    warm = gk.GERNE([tiny], beta=1.0, backend=backend, **kwargs)
    for _ in range(2):
        tiny.grad = torch.ones(64)
        warm.stash_biased()
        tiny.grad = torch.ones(64)
        warm.step()
    del warm, tiny
    torch.manual_seed(0)
    base_rss = _status_kib("VmRSS") * 1024
    dtypes = ([torch.float32, torch.bfloat16] * tensors)[:tensors] if dtype_name == "mixed" \
        else [DTYPES[dtype_name]] * tensors
    params = [torch.nn.Parameter(torch.randn(numel // tensors).to(dt)) for dt in dtypes]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = gk.GERNE(params, beta=1.0, backend=backend, **kwargs)

    def backward():  # what a backward leaves: one fresh gradient per parameter
        for p in params:
            p.grad = torch.full_like(p, 1e-3)  # (normal_ on bfloat16 allocates a float copy)

    def prepare():
        opt.zero_grad()
        backward()
        opt.stash_biased()
        backward()

    out = dict(config=label, backend=backend, dtype=dtype_name, numel=numel, tensors=tensors,
               param_bytes=param_bytes, expected_state_bytes=state_per_param * param_bytes)
    opt.zero_grad()
    backward()
    out["stash_peak"] = peak_above(opt.stash_biased)
    backward()
    out["first_step_peak"] = peak_above(opt.step)
    out["state_bytes"] = sum(t.numel() * t.element_size() for s in opt.state.values()
                             for t in s.values() if isinstance(t, torch.Tensor) and t.dim())
    prepare()
    out["steady_step_peak"] = peak_above(opt.step)

    def whole_step():
        opt.zero_grad()
        backward()
        opt.stash_biased()
        backward()
        opt.step()
    opt.zero_grad()
    _reset_peak()
    whole_step()
    out["footprint"] = _status_kib("VmHWM") * 1024 - base_rss
    out["expected_footprint"] = 3 * param_bytes + out["state_bytes"]
    prepare()
    out["torch_allocated"] = torch_allocated(opt.step)
    return out


def run_config(label, backend, dtype_name, numel, tensors):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", label, backend,
                           dtype_name, str(numel), str(tensors)], env=env, capture_output=True,
                          text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": label, "backend": backend, "dtype": dtype_name,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def table(rows):
    head = ("| config | dtype | backend | P MiB | state MiB | stash_biased | first step | "
            "steady step | allocated by torch in a step | footprint / (3P + state) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['dtype']} | {r['backend']} | {r['error']} |")
            continue
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['backend']} | {r['param_bytes'] / MIB:.0f} | "
            f"{r['state_bytes'] / MIB:.0f} | {r['stash_peak'] / MIB:+.1f} | "
            f"{r['first_step_peak'] / MIB:+.1f} | {r['steady_step_peak'] / MIB:+.1f} | "
            f"{r['torch_allocated'] / MIB:.1f} | "
            f"{r['footprint'] / MIB:.0f} / {r['expected_footprint'] / MIB:.0f} = "
            f"{r['footprint'] / r['expected_footprint']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=25, help="log2 of the parameter count")
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--backends", default="cpu,reference")
    parser.add_argument("--dtypes", default="float32,bfloat16,mixed")
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        label, backend, dtype_name, numel, tensors = args.worker
        print(json.dumps(worker(label, backend, dtype_name, int(numel), int(tensors))))
        return 0
    rows = []
    for label in args.configs.split(","):
        for dtype_name in args.dtypes.split(","):
            for backend in args.backends.split(","):
                rows.append(run_config(label, backend, dtype_name, 2 ** args.numel,
                                       args.tensors))
                print(f"{label} {dtype_name} {backend}: done", file=sys.stderr, flush=True)
    print(f"# {2 ** args.numel} parameters in {args.tensors} tensors; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("Peaks are above the memory in use right before the call (MiB).\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
