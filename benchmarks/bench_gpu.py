"""Time one GERNE optimizer step on a CUDA GPU: the CUDA and Triton kernels against torch's best.

    python benchmarks/bench_gpu.py --out DIR            # table on stdout, bench_gpu.json and
                                                        # bench_gpu.md in DIR
    python benchmarks/bench_gpu.py --quick              # fewer rounds

Problem 1: 2^26 parameters in 200 tensors of uneven sizes, float32 and bfloat16, one step of SGD
with momentum, AdamW and Lion on g = (1 + beta) g_lb - beta g_b. Variants:

  cuda_op        gerne_kernels' CUDA op alone (sgd_step_ / adam_step_ / lion_step_): one pass
  triton_op      the Triton op alone (one launch for all tensors through a device table)
  torch_only     torch._foreach_lerp_ forms g, then torch's fastest step (bench_harness.py)
  gerne_step     GERNE(backend="cuda") as users run it, defaults: stash_biased() + step()
  gerne_triton   the same with backend="triton"
  gerne_device_scalars  lr and beta as device tensors (no host sync, graph-safe)
  gerne_guarded  skip_nonfinite=True: the scan_ pass reads both gradients first

The floor: the bytes the fused step must move (bench_harness.py), at the device-to-device copy
bandwidth (dst.copy_(src) over 1 GiB, read + write bytes) measured in the same rounds; "floor"
is floor time / step time. Launches: kernels, copies and fills per call under torch.profiler.

Problem 2: many small tensors, 1,000 float32 tensors of 4,096 elements, AdamW: the ops against
torch.optim.AdamW(fused=True).step() alone (no extrapolation).

The issue's targets are judged at the end (>= 85% of the copy bandwidth, >= 1.25x torch-only for
SGD momentum and AdamW in float32 and bfloat16, <= 4 launches for a default GERNE.step() of 200
tensors), and the order of backend="auto" on CUDA that the run supports.

    python benchmarks/bench_gpu.py --cpu-smoke --out DIR

runs the whole script on the CPU at tiny sizes, the C++ CPU op standing in for the CUDA op and
Triton in its interpreter (wall-clock timing, no launch counts): it proves the script's logic
where no GPU is at hand (benchmarks/test_bench_gpu.py). Its numbers mean nothing.
"""

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_harness as h  # noqa: E402
from bench_step import fused_op_step  # noqa: E402

from gerne_kernels import _backends, _build, _reference  # noqa: E402

TARGETS = dict(floor_fraction=0.85, speedup_vs_torch_only=1.25, launches=4,
               small_tensors_vs_torch_adamw=2.0)
OPTIMIZERS = ("sgd", "adamw", "lion")
TARGET_OPTIMIZERS = ("sgd", "adamw")


def launches_per_call(fn, device):
    """GPU activities (kernels, copies, fills) of one call, by torch.profiler; None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def max_error(optimizer, impl, sizes, device, dtype):
    """max |op - reference| / (1 + |reference|) over the parameters after one step."""
    results = []
    for ops in (impl, _reference):
        problem = h.Problem.random(sizes, device, dtype, seed=7)
        torch.manual_seed(7)  # the same optimizer state for both
        fused_op_step(problem, optimizer, ops, device)()
        results.append(problem)
    ours, theirs = results
    return max(((a.float() - b.float()).abs() / (1 + b.float().abs())).max().item()
               for a, b in zip(ours.params, theirs.params) if a.numel())


class CopyBandwidth:
    """dst.copy_(src) over ``nbytes``: read + write bytes per second."""

    def __init__(self, nbytes, device):
        self.numel = nbytes // 4
        self.src = torch.randn(self.numel, device=device)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)

    def gbps(self, seconds):
        return 2 * 4 * self.numel / seconds / 1e9


class Run:
    """What every problem of one run shares: device, backends, timing rounds, the copy."""

    def __init__(self, args):
        self.device = "cpu" if args.cpu_smoke else "cuda"
        self.op_backend = "cpu" if args.cpu_smoke else "cuda"
        self.rounds = 2 if args.cpu_smoke else (7 if args.quick else 15)
        self.copy = CopyBandwidth(1 << (20 if args.cpu_smoke else 30), self.device)
        try:
            _backends.implementation("triton", self.device, torch.float32)
            self.triton = "ok"
        except Exception as exc:  # not installed, failed import: the rows say why
            self.triton = f"{type(exc).__name__}: {exc}"

    def impl(self, backend, dtype, tensor_scalars=False):
        return _backends.implementation(backend, self.device, dtype, tensor_scalars)

    def time(self, fns):
        samples = h.time_interleaved({**fns, "copy": self.copy.step}, self.rounds, self.device)
        gbps = self.copy.gbps(statistics.median(samples.pop("copy")))
        return samples, gbps


def run_large(run, optimizer, dtype, numel, tensors):
    sizes = h.uneven_sizes(numel, tensors)
    device = run.device

    def fresh():
        return h.Problem.random(sizes, device, dtype)

    base = h.OPTIMIZERS[optimizer].gerne_kwargs
    steps = {"cuda_op": fused_op_step(fresh(), optimizer, run.impl(run.op_backend, dtype),
                                      device)}
    if run.triton == "ok":
        steps["triton_op"] = fused_op_step(fresh(), optimizer, run.impl("triton", dtype), device)
    steps["torch_only"] = h.torch_only_step(fresh(), optimizer)
    steps["gerne_step"] = h.gerne_step(fresh(), optimizer, run.op_backend)
    if run.triton == "ok":
        steps["gerne_triton"] = h.gerne_step(fresh(), optimizer, "triton")
    steps["gerne_device_scalars"] = h.gerne_step(
        fresh(), optimizer, run.op_backend,
        lr=torch.tensor(base["lr"], dtype=torch.float64, device=device))
    steps["gerne_guarded"] = h.gerne_step(fresh(), optimizer, run.op_backend,
                                          skip_nonfinite=True)
    for step in steps.values():
        step()  # the state exists: what is timed is a second step
    samples, gbps = run.time(steps)
    dtype_name = str(dtype).replace("torch.", "")
    bytes_per_param = h.OPTIMIZERS[optimizer].bytes_per_param * dtype.itemsize // 4
    rows = h.rows_of(optimizer, numel, tensors, samples, gbps, ("torch_only",), bytes_per_param)
    errors = {"cuda_op": max_error(optimizer, run.impl(run.op_backend, dtype), sizes[:20],
                                   device, dtype)}
    if run.triton == "ok":
        errors["triton_op"] = max_error(optimizer, run.impl("triton", dtype), sizes[:20], device,
                                        dtype)
    out = []
    for row in rows:
        d = row.as_dict()
        d.update(problem=f"{optimizer} {dtype_name}, 2^{numel.bit_length() - 1} params in "
                         f"{tensors} tensors", dtype=dtype_name,
                 launches=launches_per_call(steps[row.variant], device),
                 max_error=errors.get(row.variant))
        out.append(d)
    return out


def run_small(run, tensors, numel):
    sizes = [numel] * tensors
    problems = [h.Problem.random(sizes, run.device, seed=s) for s in range(4)]
    steps = {"cuda_op": fused_op_step(problems[0], "adamw", run.impl(run.op_backend,
                                                                        torch.float32),
                                      run.device)}
    if run.triton == "ok":
        steps["triton_op"] = fused_op_step(problems[3], "adamw",
                                           run.impl("triton", torch.float32), run.device)
    problems[1].assign(problems[1].grads_lb)
    steps["torch_adamw_fused_alone"] = h.torch_optimizer_step(problems[1], "adamw")
    steps["torch_only"] = h.torch_only_step(problems[2], "adamw")
    for step in steps.values():
        step()
    samples, _ = run.time(steps)
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    return [dict(problem=f"adamw, {tensors} tensors of {numel}", variant=name, ms=ms[name],
                 vs_torch_adamw_alone=ms[name] / ms["torch_adamw_fused_alone"],
                 launches=launches_per_call(steps[name], run.device)) for name in steps]


def verdicts(large, small):
    """The issue's targets, per backend that ran."""
    out = []
    for backend, op, step in (("cuda", "cuda_op", "gerne_step"),
                              ("triton", "triton_op", "gerne_triton")):
        for row in large:
            if row["variant"] == op and row["dtype"] == "float32":
                out.append(dict(backend=backend,
                                target=f"{row['optimizer']} float32: >= 85% of copy bandwidth",
                                value=f"{100 * row['floor_fraction']:.1f}%",
                                ok=row["floor_fraction"] >= TARGETS["floor_fraction"]))
            if row["variant"] == step and row["optimizer"] in TARGET_OPTIMIZERS:
                speedup = row["speedups"]["torch_only"]
                out.append(dict(backend=backend,
                                target=f"{row['optimizer']} {row['dtype']}: GERNE.step() >= "
                                       "1.25x torch-only",
                                value=f"{speedup:.2f}x",
                                ok=speedup >= TARGETS["speedup_vs_torch_only"]))
                if row["dtype"] == "float32":
                    out.append(dict(backend=backend,
                                    target=f"{row['optimizer']}: <= 4 launches per GERNE.step()",
                                    value=str(row["launches"]),
                                    ok=row["launches"] is not None
                                    and row["launches"] <= TARGETS["launches"]))
        for row in small:
            if row["variant"] == op:
                out.append(dict(backend=backend, target=f"{row['problem']}: <= 2x torch AdamW",
                                value=f"{row['vs_torch_adamw_alone']:.2f}x",
                                ok=row["vs_torch_adamw_alone"]
                                <= TARGETS["small_tensors_vs_torch_adamw"]))
    return out


def auto_order(large, small):
    """backend="auto"'s order on CUDA that this run supports: the backend whose op is faster in
    most problems where both ran (ties to cuda); None when Triton did not run."""
    times = {}
    for row in large + small:
        if row["variant"] in ("cuda_op", "triton_op"):
            times.setdefault(row["problem"], {})[row["variant"]] = row["ms"]
    both = [t for t in times.values() if len(t) == 2]
    if not both:
        return None
    triton_wins = sum(t["triton_op"] < t["cuda_op"] for t in both)
    order = ("triton", "cuda") if triton_wins > len(both) - triton_wins else ("cuda", "triton")
    return dict(order=order, faster_first=max(triton_wins, len(both) - triton_wins),
                problems=len(both))


def markdown(meta, large, small, checks):
    copy = large[0]["bandwidth_gbps"] if large else float("nan")
    lines = [f"GPU check {meta['date']}: {meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}", "",
             f"Device-to-device copy: {copy:.0f} GB/s (read + write).", "",
             "| problem | variant | ms/step | floor | vs torch-only | launches | max err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in large:
        err = "" if r["max_error"] is None else f"{r['max_error']:.1e}"
        lines.append(f"| {r['problem']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{100 * r['floor_fraction']:.1f}% | {r['speedups']['torch_only']:.2f}x | "
                     f"{r['launches']} | {err} |")
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
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible; nothing to measure "
              "(--cpu-smoke checks the script on the CPU)")
        return 2
    run = Run(args)
    built = _build.build(run.op_backend)
    if not built.ok:
        print(f"bench_gpu: the {run.op_backend} extension failed to build: {built.error} "
              f"(log: {built.log_path})")
        return 1
    env = h.environment()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                gpu=env.get("gpu", "CPU smoke run (not a GPU)") if not args.cpu_smoke
                else "CPU smoke run (not a GPU)", torch=torch.__version__,
                cuda=torch.version.cuda, triton=env.get("triton", "not installed"),
                numel=1 << args.numel_log2, tensors=args.tensors, rounds=run.rounds,
                build_seconds=built.seconds, triton_status=run.triton)
    large = []
    for dtype in (torch.float32, torch.bfloat16):
        for optimizer in OPTIMIZERS:
            large += run_large(run, optimizer, dtype, 1 << args.numel_log2, args.tensors)
            if run.device == "cuda":
                torch.cuda.empty_cache()
    small = run_small(run, args.small_tensors, args.small_numel)
    checks = verdicts(large, small)
    report = markdown(meta, large, small, checks)
    print(report)
    if run.triton != "ok":
        print(f"triton: skipped ({run.triton})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump(dict(meta=meta, large=large, small=small, targets=checks,
                           auto_order=auto_order(large, small)), f, indent=1)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
