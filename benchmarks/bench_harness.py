"""What the benchmarks share: the problems, the torch-only baselines, the timer, the bandwidth
floor and the rows they print.

A step forms g = (1 + beta) g_lb - beta g_b from the two batches' gradients and applies a base
optimizer to float32 (or bfloat16) parameters. The base optimizers and the bytes their fused
step must move per float32 parameter (read once, written once; ``_ops.OpSpec.bytes_per_param``):

    sgd    SGD with momentum   read p, g_b, g_lb, buf       write p, buf     24 B
    adamw  AdamW               read p, g_b, g_lb, m, v      write p, m, v    32 B
    lion   Lion                read p, g_b, g_lb, m         write p, m       24 B

torch-only: torch._foreach_lerp_(g_b, g_lb, 1 + beta) writes g into g_b (lerp(g_b, g_lb, w) =
(1 + beta) g_lb - beta g_b; 12 B), then the fastest step torch offers on g: SGD / AdamW with
fused=True, and for Lion (which torch lacks) the faster of a foreach implementation and that
implementation compiled by torch.compile. "checked" adds the inf/NaN check a GradScaler makes
(reads and rewrites both gradients: 16 B).

Timing: the variants take turns in every round (so they see the same machine), each round
timing enough calls to last a few milliseconds (CUDA events on a GPU); the median of the rounds
is reported. The floor's bandwidth is measured in the same rounds by in-place torch kernels
(the read-modify-write pattern of a step: no write-allocate traffic).
"""

import dataclasses
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
except ImportError:  # a checkout without `pip install .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gerne_kernels as gk
from gerne_kernels import _ops

BETA = 1.0
LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2
LION_BETAS = (0.9, 0.99)
MIN_SAMPLE_SECONDS = 0.004


@dataclasses.dataclass(frozen=True)
class BaseOptimizer:
    """A base optimizer as the benchmarks run it: GERNE's name, its op, its hyperparameters."""
    name: str
    op: str
    gerne_kwargs: dict

    @property
    def bytes_per_param(self):
        return _ops.BY_NAME[self.op].bytes_per_param


OPTIMIZERS = {
    "sgd": BaseOptimizer("sgd", "sgd_step_", dict(lr=LR, momentum=MOMENTUM,
                                                  weight_decay=WEIGHT_DECAY)),
    "adamw": BaseOptimizer("adamw", "adam_step_", dict(lr=LR, weight_decay=WEIGHT_DECAY)),
    "lion": BaseOptimizer("lion", "lion_step_", dict(lr=LR, betas=LION_BETAS,
                                                     weight_decay=WEIGHT_DECAY)),
}


# ------------------------------------------------------------------------------------------------
# Problems

def split_sizes(numel, tensors):
    """``tensors`` sizes summing to numel, as even as possible."""
    tensors = max(1, min(tensors, numel))
    base, extra = divmod(numel, tensors)
    return [base + (1 if i < extra else 0) for i in range(tensors)]


def uneven_sizes(numel, tensors):
    """``tensors`` sizes summing to numel, unequal as a model's layers are (weights 1..2, most
    sizes multiples of 64, the last one ragged)."""
    weights = [1.0 + ((i * 7919) % 101) / 100.0 for i in range(tensors)]
    total = sum(weights)
    sizes = [max(64, int(numel * w / total) // 64 * 64) for w in weights[:-1]]
    sizes.append(numel - sum(sizes))
    if sizes[-1] <= 0:
        raise ValueError(f"{numel} elements are too few for {tensors} uneven tensors")
    return sizes


@dataclasses.dataclass
class Problem:
    """Parameters (leaves), the two gradients and a torch.Generator-made start, on one device."""
    params: list
    grads_b: list
    grads_lb: list

    @classmethod
    def random(cls, sizes, device="cpu", dtype=torch.float32, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)

        def tensors():
            return [torch.randn(n, generator=gen, device=device).to(dtype) for n in sizes]

        params = [torch.nn.Parameter(t) for t in tensors()]
        return cls(params, tensors(), tensors())

    def assign(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g


def gerne_step(problem, optimizer, backend, **kwargs):
    """GERNE as users run it: stash_biased() and step() on gradients assigned to .grad."""
    base = OPTIMIZERS[optimizer]
    opt = gk.GERNE(problem.params, optimizer=base.name, beta=BETA, backend=backend,
                   **dict(base.gerne_kwargs, **kwargs))

    def step():
        problem.assign(problem.grads_b)
        opt.stash_biased()
        problem.assign(problem.grads_lb)
        opt.step()
    return step


# ------------------------------------------------------------------------------------------------
# torch-only baselines

def torch_lion_foreach(params, exp_avgs, lr, betas, weight_decay):
    """The Lion step with torch's foreach ops (grads in .grad): p <- p (1 - lr wd) -
    lr sign(lerp(m, g, 1 - beta1)); m <- lerp(m, g, 1 - beta2)."""
    def step():
        grads = [p.grad for p in params]
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        update = torch._foreach_lerp(exp_avgs, grads, 1 - betas[0])
        torch._foreach_sign_(update)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1 - betas[1])
    return step


def torch_optimizer_step(problem, optimizer, compile_lion=False):
    """The fastest torch step on .grad for the base optimizer (no extrapolation)."""
    if optimizer == "sgd":
        return torch.optim.SGD(problem.params, lr=LR, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY, fused=True).step
    if optimizer == "adamw":
        return torch.optim.AdamW(problem.params, lr=LR, weight_decay=WEIGHT_DECAY,
                                 fused=True).step
    exp_avgs = [torch.zeros_like(p) for p in problem.params]
    step = torch_lion_foreach(problem.params, exp_avgs, LR, LION_BETAS, WEIGHT_DECAY)
    if compile_lion:
        step = torch.compile(step, fullgraph=True)
    return torch.no_grad()(step)


def torch_only_step(problem, optimizer, checked=False, compile_lion=False):
    """torch._foreach_lerp_ forms g in g_b, then the fastest torch optimizer steps on it; with
    ``checked``, GradScaler's inf/NaN check of both gradients first (found_inf skips the fused
    torch optimizers' update)."""
    problem.assign(problem.grads_b)
    optimizer_step = torch_optimizer_step(problem, optimizer, compile_lion)
    if not checked:
        def step():
            torch._foreach_lerp_(problem.grads_b, problem.grads_lb, 1.0 + BETA)
            optimizer_step()
        return step
    device = problem.params[0].device
    found_inf, one = torch.zeros((), device=device), torch.ones((), device=device)

    def checked_step():
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(problem.grads_b, found_inf, one)
        torch._amp_foreach_non_finite_check_and_unscale_(problem.grads_lb, found_inf, one)
        torch._foreach_lerp_(problem.grads_b, problem.grads_lb, 1.0 + BETA)
        optimizer_step()
    return checked_step


# ------------------------------------------------------------------------------------------------
# Timing

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, calls, device):
    """Seconds per call of ``calls`` back-to-back calls (CUDA events on a GPU)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def time_interleaved(fns, repeats, device="cpu", warmup=2):
    """{name: [seconds per call in each round]}, the functions taking turns in every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    counts = {name: max(1, math.ceil(MIN_SAMPLE_SECONDS / max(_seconds(fn, 1, device), 1e-7)))
              for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, counts[name], device))
    return samples


class Bandwidth:
    """Effective memory bandwidth (GB/s) of in-place torch kernels over float32 arrays of
    ``numel`` elements (the default 2^25 is four times a 32 MiB last-level cache; on a GPU use
    arrays far beyond its L2)."""

    def __init__(self, numel=1 << 25, device="cpu"):
        self.numel = numel
        a, b, c = (torch.randn(numel, device=device) for _ in range(3))
        self.kernels = {
            "add_ (a += b; 12 B/elem)": (lambda: a.add_(b), 12),
            "lerp_ (a += w (b - a); 12 B/elem)": (lambda: a.lerp_(b, 0.5), 12),
            "addcmul_ (a += s b c; 16 B/elem)": (lambda: a.addcmul_(b, c, value=1e-3), 16),
            "copy_ (a = b; 8 B/elem)": (lambda: a.copy_(b), 8),
        }

    def functions(self):
        return {name: fn for name, (fn, _) in self.kernels.items()}

    def gbps(self, samples):
        """{kernel: GB/s} from the timing samples of its kernels (median)."""
        return {name: self.kernels[name][1] * self.numel / statistics.median(values) / 1e9
                for name, values in samples.items() if name in self.kernels}


@dataclasses.dataclass
class Row:
    """One variant at one point: its time, the floor and its speedups."""
    optimizer: str
    variant: str
    numel: int
    tensors: int
    ms: float
    ms_min: float
    bandwidth_gbps: float
    floor_ms: float
    speedups: dict

    @property
    def floor_fraction(self):
        return self.floor_ms / self.ms

    def as_dict(self):
        return dict(dataclasses.asdict(self), floor_fraction=self.floor_fraction)


def rows_of(optimizer, numel, tensors, samples, gbps, baselines, bytes_per_param=None):
    """Rows from {variant: samples}; speedups over each baseline variant present."""
    seconds = {variant: statistics.median(values) for variant, values in samples.items()}
    floor_bytes = (bytes_per_param or OPTIMIZERS[optimizer].bytes_per_param) * numel
    floor_ms = floor_bytes / (gbps * 1e9) * 1e3
    return [Row(optimizer, variant, numel, tensors, seconds[variant] * 1e3,
                min(samples[variant]) * 1e3, gbps, floor_ms,
                {base: seconds[base] / seconds[variant] for base in baselines if base in seconds})
            for variant in samples]


def format_rows(rows, baselines):
    header = (f"{'optim':6} {'variant':30} {'params':>10} {'tensors':>7} {'ms/step':>9} "
              f"{'ms(min)':>8} {'floor':>6} " + " ".join(f"{'vs ' + b:>20}" for b in baselines))
    lines = [header]
    for r in rows:
        lines.append(f"{r.optimizer:6} {r.variant:30} {r.numel:>10} {r.tensors:>7} "
                     f"{r.ms:9.3f} {r.ms_min:8.3f} {100 * r.floor_fraction:5.0f}% " + " ".join(
                         f"{r.speedups[b]:19.2f}x" if b in r.speedups else f"{'':>20}"
                         for b in baselines))
    return "\n".join(lines)


def machine_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def environment():
    """What a result needs to be read later: machine, threads, versions, load."""
    info = dict(machine=machine_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), load_average=os.getloadavg(),
                argv=" ".join(sys.argv))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
