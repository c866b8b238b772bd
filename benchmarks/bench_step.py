"""Time one GERNE optimizer step on the CPU: the fused kernel against what torch alone offers.

    python benchmarks/bench_step.py --no-sweeps           # the main tables (2^24 parameters)
    python benchmarks/bench_step.py                       # + size and tensor-count sweeps, JSON
    python benchmarks/bench_step.py --training            # inside a real training iteration
    python benchmarks/bench_step.py --quick               # fewer sizes and rounds

Synthetic gradients (gradients assigned to .grad): one step of SGD with momentum, AdamW or Lion
on float32 parameters, fed g = (1 + beta) g_lb - beta g_b. The variants:

  reference            gerne_kernels' pure-PyTorch reference ops (the specification)
  torch_only           torch._foreach_lerp_ forms g, then torch's fastest step on it
                       (bench_harness.py: SGD/AdamW fused=True; Lion: foreach, and compiled)
  torch_only_checked   the same after GradScaler's inf/NaN check of both gradients
  fused_op             the C++ op alone (sgd_step_ / adam_step_ / lion_step_): one pass
  gerne_step           GERNE(backend="cpu") as users run it, with its defaults: stash_biased()
                       and step() (no inf/NaN check without a GradScaler, as torch.optim)
  gerne_step_guarded   skip_nonfinite=True: the scan_ pass reads both gradients first
  gerne_step_tensor_scalars  lr and beta as tensors (the ops' .tensor overloads)

The floor: the bytes the fused step must move (bench_harness.py), at the bandwidth of the best
in-place torch kernel timed in the same rounds; "floor" is floor time / step time.

Training iteration (--training): an 8-layer Linear stack (about 2^24 parameters), batch 32,
forward and backward of the biased and the less-biased batch, then the step: torch-only (g_b
moved aside, _foreach_lerp_, fused torch optimizer) against GERNE (stash_biased(), step()), and
the fused op alone on the two backwards' gradients (no Python besides the call: what the step's
Python side costs on top). The step is timed alone inside each iteration, and the whole
iteration too.
"""

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

import bench_harness as h
from bench_harness import gk
from gerne_kernels import _backends, _build, _reference

ALL_OPTIMIZERS = ("sgd", "adamw", "lion")


def fused_op_step(problem, optimizer, ops, device="cpu"):
    """The op alone, on state of the second step (ops: an Implementation or _reference)."""
    params = [p.detach() for p in problem.params]
    found_inf = torch.zeros((), device=device)
    scales = dict(scale_b=-h.BETA, scale_lb=1.0 + h.BETA)
    op = ops.op(h.OPTIMIZERS[optimizer].op) if hasattr(ops, "op") else getattr(
        ops, h.OPTIMIZERS[optimizer].op)
    if optimizer == "sgd":
        buffers = [torch.randn_like(p) for p in params]
        return lambda: op(params, problem.grads_b, problem.grads_lb, buffers, found_inf,
                          lr=h.LR, momentum=h.MOMENTUM, dampening=0.0, nesterov=False,
                          weight_decay=h.WEIGHT_DECAY, maximize=False, is_first_step=False,
                          **scales)
    if optimizer == "adamw":
        exp_avgs = [torch.randn_like(p) for p in params]
        exp_avg_sqs = [torch.rand_like(p) for p in params]
        steps = [torch.tensor(1.0, device=device) for _ in params]
        return lambda: op(params, problem.grads_b, problem.grads_lb, exp_avgs, exp_avg_sqs, [],
                          steps, found_inf, lr=h.LR, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=h.WEIGHT_DECAY, amsgrad=False, maximize=False,
                          decoupled_weight_decay=True, **scales)
    exp_avgs = [torch.randn_like(p) for p in params]
    return lambda: op(params, problem.grads_b, problem.grads_lb, exp_avgs, found_inf, lr=h.LR,
                      beta1=h.LION_BETAS[0], beta2=h.LION_BETAS[1],
                      weight_decay=h.WEIGHT_DECAY, maximize=False, **scales)


def variants_for(optimizer, numel, tensors, with_reference, compile_lion):
    """{variant: step callable}, each on its own copy of the problem, state created."""
    sizes = h.split_sizes(numel, tensors)

    def fresh():
        return h.Problem.random(sizes)

    cpu = _backends.implementation("cpu", "cpu", torch.float32)
    steps = {}
    if with_reference:
        steps["reference"] = fused_op_step(fresh(), optimizer, _reference)
    steps["torch_only"] = h.torch_only_step(fresh(), optimizer)
    if optimizer == "lion" and compile_lion:
        steps["torch_only_compiled"] = h.torch_only_step(fresh(), optimizer, compile_lion=True)
    steps["torch_only_checked"] = h.torch_only_step(fresh(), optimizer, checked=True)
    steps["fused_op"] = fused_op_step(fresh(), optimizer, cpu)
    steps["gerne_step"] = h.gerne_step(fresh(), optimizer, "cpu")
    steps["gerne_step_guarded"] = h.gerne_step(fresh(), optimizer, "cpu", skip_nonfinite=True)
    base = h.OPTIMIZERS[optimizer].gerne_kwargs
    steps["gerne_step_tensor_scalars"] = h.gerne_step(
        fresh(), optimizer, "cpu", lr=torch.tensor(base["lr"], dtype=torch.float64))
    for step in steps.values():
        step()  # creates the optimizer state: what is timed is a second step
    return steps


def run_point(optimizer, numel, tensors, repeats, bandwidth, with_reference, compile_lion):
    steps = variants_for(optimizer, numel, tensors, with_reference, compile_lion)
    samples = h.time_interleaved({**steps, **bandwidth.functions()}, repeats)
    gbps = max(bandwidth.gbps({name: samples.pop(name) for name in bandwidth.kernels}).values())
    if "torch_only_compiled" in samples:  # the baseline is the faster torch-only Lion
        if statistics.median(samples["torch_only_compiled"]) < statistics.median(
                samples["torch_only"]):
            samples["torch_only_foreach"] = samples.pop("torch_only")
            samples["torch_only"] = samples.pop("torch_only_compiled")
        else:
            samples["torch_only_compiled_slower"] = samples.pop("torch_only_compiled")
    return h.rows_of(optimizer, numel, len(h.split_sizes(numel, tensors)), samples, gbps,
                     BASELINES)


BASELINES = ("torch_only", "torch_only_checked")


# ------------------------------------------------------------------------------------------------
# Training iteration

def linear_stack(layers, width, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


class TrainingIteration:
    """One variant's training iteration; ``step_seconds`` collects the step's own time."""

    def __init__(self, variant, optimizer, layers, width, batch):
        self.variant = variant
        self.model = linear_stack(layers, width)
        gen = torch.Generator().manual_seed(1)
        self.x_b, self.x_lb = (torch.randn(batch, width, generator=gen) for _ in range(2))
        self.params = list(self.model.parameters())
        self.step_seconds = []
        if variant == "torch_only":
            problem = h.Problem(self.params, [], [])
            self.optimizer_step = h.torch_optimizer_step(problem, optimizer)
        elif variant == "fused_op":  # its lists are refilled with each iteration's gradients
            self.problem = h.Problem(self.params, [], [])
            self.op_step = fused_op_step(self.problem, optimizer,
                                         _backends.implementation("cpu", "cpu", torch.float32))
        else:
            kwargs = dict(skip_nonfinite=True) if variant == "gerne_guarded" else {}
            self.opt = gk.GERNE(self.params, optimizer=optimizer, beta=h.BETA, backend="cpu",
                                **dict(h.OPTIMIZERS[optimizer].gerne_kwargs, **kwargs))

    def loss(self, x):
        return self.model(x).square().mean()

    def __call__(self):
        for p in self.params:
            p.grad = None
        self.loss(self.x_b).backward()
        if self.variant in ("torch_only", "fused_op"):
            grads_b = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            self.loss(self.x_lb).backward()
            if self.variant == "fused_op":
                self.problem.grads_b[:] = grads_b
                self.problem.grads_lb[:] = [p.grad for p in self.params]
                start = time.perf_counter()
                self.op_step()
                self.step_seconds.append(time.perf_counter() - start)
                # Released as GERNE's step releases the stash: the next backward runs without them.
                self.problem.grads_b.clear()
                self.problem.grads_lb.clear()
                return
            else:
                start = time.perf_counter()
                torch._foreach_lerp_(grads_b, [p.grad for p in self.params], 1.0 + h.BETA)
                for p, g in zip(self.params, grads_b):
                    p.grad = g
                self.optimizer_step()
        else:
            self.opt.stash_biased()
            self.loss(self.x_lb).backward()
            start = time.perf_counter()
            self.opt.step()
        self.step_seconds.append(time.perf_counter() - start)


def run_training(optimizer, layers, width, batch, repeats):
    """Rows of step and iteration times for torch-only and GERNE, in interleaved rounds."""
    iterations = {v: TrainingIteration(v, optimizer, layers, width, batch)
                  for v in ("torch_only", "fused_op", "gerne", "gerne_guarded")}
    for it in iterations.values():
        it()
        it()
        it.step_seconds.clear()
    totals = {v: [] for v in iterations}
    for _ in range(repeats):
        for v, it in iterations.items():
            start = time.perf_counter()
            it()
            totals[v].append(time.perf_counter() - start)
    numel = sum(p.numel() for p in iterations["gerne"].params)
    rows = []
    for v, it in iterations.items():
        step_ms = statistics.median(it.step_seconds) * 1e3
        iteration_ms = statistics.median(totals[v]) * 1e3
        rows.append(dict(optimizer=optimizer, variant=v, numel=numel, step_ms=step_ms,
                         iteration_ms=iteration_ms))
    base = rows[0]
    for row in rows:
        row["step_speedup"] = base["step_ms"] / row["step_ms"]
        row["iteration_speedup"] = base["iteration_ms"] / row["iteration_ms"]
    return rows


def format_training(rows):
    lines = [f"{'optim':6} {'variant':14} {'params':>10} {'step ms':>9} {'vs torch':>9} "
             f"{'iteration ms':>13} {'vs torch':>9}"]
    for r in rows:
        lines.append(f"{r['optimizer']:6} {r['variant']:14} {r['numel']:>10} {r['step_ms']:9.2f} "
                     f"{r['step_speedup']:8.2f}x {r['iteration_ms']:13.1f} "
                     f"{r['iteration_speedup']:8.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, counts and rounds")
    parser.add_argument("--numel-log2", type=int, default=24)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS))
    parser.add_argument("--sizes", default=None, help="log2 sizes of the size sweep")
    parser.add_argument("--counts", default=None, help="tensor counts of the count sweep")
    parser.add_argument("--no-sweeps", action="store_true", help="only the main tables")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--no-compile", action="store_true",
                        help="no torch.compile'd Lion baseline (it compiles for ~a minute)")
    parser.add_argument("--training", action="store_true",
                        help="the step inside a real training iteration (Linear stack)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1448, help="8 x 1448^2 ~ 2^24 parameters")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--bandwidth-log2", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    built = _build.build("cpu")
    if not built.ok:
        sys.exit(f"the cpu extension failed to build: {built.error} (log: {built.log_path})")
    repeats = args.repeats or (5 if args.quick else 15)
    optimizers = args.optimizers.split(",")
    results = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                   **h.environment(), beta=h.BETA)
    print(f"machine: {results['machine']}, {results['threads']} threads, torch {torch.__version__}")
    if args.training:
        results["training"] = []
        for optimizer in optimizers:
            rows = run_training(optimizer, args.layers, args.width, args.batch, repeats)
            results["training"] += rows
            print(format_training(rows))
    else:
        bandwidth = h.Bandwidth(1 << args.bandwidth_log2)
        numel = 1 << args.numel_log2
        print(f"\nmain: 2^{args.numel_log2} float32 parameters in {args.tensors} tensors")
        results["main"] = []
        for optimizer in optimizers:
            rows = run_point(optimizer, numel, args.tensors, repeats, bandwidth,
                             not args.no_reference, not args.no_compile)
            results["main"] += [r.as_dict() for r in rows]
            print(h.format_rows(rows, BASELINES))
        sizes = [] if args.no_sweeps else [1 << int(s) for s in (
            args.sizes or ("16,20,24" if args.quick else "12,14,16,18,20,22,24")).split(",")]
        counts = [] if args.no_sweeps else [int(c) for c in (
            args.counts or ("1,50,1000" if args.quick else "1,10,50,200,1000")).split(",")]
        results["size_sweep"], results["count_sweep"] = [], []
        for key, points in (("size_sweep", [(s, args.tensors) for s in sizes]),
                            ("count_sweep", [(numel, c) for c in counts])):
            for optimizer in optimizers:
                for n, t in points:
                    rows = run_point(optimizer, n, t, repeats, bandwidth, False, False)
                    results[key] += [r.as_dict() for r in rows]
                    print(h.format_rows(rows, BASELINES))
    results["load_average_end"] = list(__import__("os").getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
