"""``python -m gerne_kernels demo``: GERNE against ERM on an offline Colored MNIST, on the CPU.

Trains a 3-layer MLP on the offline Colored MNIST (:mod:`gerne_kernels.datasets`,
digit = class, stroke color = attribute, ``--minority`` bias-conflicting training
samples, unbiased test set) with four methods, every one for ``--steps`` steps of
SGD (momentum 0.9, cosine learning-rate decay) on class-balanced batches of
``--batch-size`` samples per class:

* ERM: plain ERM on class-balanced batches (``torch.optim.SGD`` on ``B_b``);
* group resampling: GERNE with ``c = 1, beta = 0``, i.e. group-balanced batches;
* GERNE, known attributes: ``--c`` and ``--beta`` (default ``beta = 1/c - 1``,
  so ``c * (beta + 1) = 1``: every group weighted equally in expectation, the GBA
  target; it must lie inside the bounds of Eq. 9, which are checked);
* GERNE, unknown attributes (Algorithm 2): a biased model (a tenth of the learning
  rate, twice the weight decay, best validation CBA) ranks each class by confidence,
  the ``--t`` least confident share becomes pseudo-attribute 1, and GERNE runs on these
  two pseudo-groups with ``--beta-unknown`` (default ``--beta-unknown-frac`` times
  the pseudo-groups' beta_max).

It prints a table of test GBA and WGA (mean ± sample std over ``--seeds``), and saves
``demo.png`` (accuracy per method; GBA of known-attribute GERNE against beta up to
beta_max, first seed) and, with ``--json``, the numbers.

The GERNE step is ``opt.zero_grad(); loss_b.backward(); opt.stash_biased();
loss_lb.backward(); opt.step()``; the optimizer uses the fused backend where one is
available (``--backend``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bounds import beta_bounds
from .datasets.colored_mnist import colored_mnist
from .metrics import group_metrics
from .pseudo_groups import model_scores, pseudo_attributes, train_biased_model
from .sampler import ClassBalancedSampler, TwoBatchSampler

__all__ = ["main", "build_parser", "run_demo", "make_mlp"]

METHODS = ("erm", "resampling", "gerne_known", "gerne_unknown")


def make_mlp(in_features: int, hidden: int = 100, num_classes: int = 10) -> nn.Module:
    """The 3-layer MLP of the paper's Colored MNIST experiments."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gerne_kernels demo",
        description="ERM, group resampling and GERNE (known / unknown attributes) on an "
                    "offline Colored MNIST; prints test GBA and WGA per method.")
    p.add_argument("--minority", type=float, default=0.01,
                   help="share of bias-conflicting training samples (default 0.01)")
    p.add_argument("--c", type=float, default=0.5, help="GERNE's c in (0, 1] (default 0.5)")
    p.add_argument("--beta", type=float, default=None,
                   help="GERNE's beta, known attributes (default 1/c - 1)")
    p.add_argument("--t", type=float, default=0.02,
                   help="share of each class made pseudo-attribute 1, unknown attributes")
    p.add_argument("--beta-unknown", type=float, default=None,
                   help="beta with pseudo-attributes (default: --beta-unknown-frac * beta_max)")
    p.add_argument("--beta-unknown-frac", type=float, default=0.75,
                   help="default beta-unknown as a share of the pseudo-groups' beta_max")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--biased-steps", type=int, default=300,
                   help="steps of the biased model (unknown attributes)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per class per batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=100, help="MLP width")
    p.add_argument("--image-size", type=int, default=14, help="digits are resized to this side")
    p.add_argument("--sweep", type=int, default=6,
                   help="points of the GBA-against-beta curve (0: no sweep)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto")
    p.add_argument("--backend", default="auto", help="GERNE backend (auto picks the fused one)")
    p.add_argument("--out", default="demo_out", help="output folder (plot, JSON)")
    p.add_argument("--json", nargs="?", const="demo.json", default=None,
                   help="write the numbers as JSON (a path, relative to --out, default demo.json)")
    p.add_argument("--no-plot", action="store_true", help="do not save the PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


class _Run:
    """Shared data and settings of one demo invocation."""

    def __init__(self, args, device: torch.device, progress):
        self.args, self.device, self.progress = args, device, progress
        kw = dict(minority=args.minority, size=args.image_size, flatten=True)
        self.train = colored_mnist("train", **kw)
        self.val = colored_mnist("val", **kw)
        self.test = colored_mnist("test", **kw)
        self.x = self.train.x.to(device)
        self.y = self.train.y.to(device)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return make_mlp(self.train.x.shape[1], self.args.hidden).to(self.device)

    def evaluate(self, model: nn.Module) -> dict:
        scores = model_scores(model, self.test.x, device=self.device)
        m = group_metrics(scores, self.test.y, self.test.a)
        return {"gba": m.gba, "wga": m.wga, "accuracy": m.accuracy,
                "empty_groups": [list(g) for g in m.empty_groups]}

    def train_erm(self, seed: int) -> dict:
        a = self.args
        model, g = self.model(seed), torch.Generator().manual_seed(seed)
        sampler = ClassBalancedSampler(self.train.y, a.batch_size, generator=g,
                                       steps_per_epoch=a.steps)
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9,
                              weight_decay=a.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
        for idx in sampler:
            idx = idx.to(self.device)
            opt.zero_grad()
            F.cross_entropy(model(self.x[idx]), self.y[idx]).backward()
            opt.step()
            sched.step()
            self.progress(1)
        return self.evaluate(model)

    def train_gerne(self, seed: int, attributes: torch.Tensor, c: float, beta: float,
                    bounds=None) -> dict:
        """Algorithm 1. beta = 0 needs no biased batch (and skips its backward)."""
        import gerne_kernels

        a = self.args
        model, g = self.model(seed), torch.Generator().manual_seed(seed)
        sampler = TwoBatchSampler(self.train.y, attributes, a.batch_size, c, generator=g,
                                  steps_per_epoch=a.steps)
        opt = gerne_kernels.GERNE(model.parameters(), optimizer="sgd", lr=a.lr, momentum=0.9,
                                  weight_decay=a.weight_decay, beta=beta, beta_bounds=bounds,
                                  backend=a.backend)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
        for idx_b, idx_lb in sampler:
            opt.zero_grad()
            if beta != 0:
                idx_b = idx_b.to(self.device)
                F.cross_entropy(model(self.x[idx_b]), self.y[idx_b]).backward()
                opt.stash_biased()
            idx_lb = idx_lb.to(self.device)
            F.cross_entropy(model(self.x[idx_lb]), self.y[idx_lb]).backward()
            opt.step()
            sched.step()
            self.progress(1)
        out = self.evaluate(model)
        out["beta"], out["c"] = beta, c
        return out

    def pseudo_groups(self, seed: int):
        """Algorithm 2, steps 1-2: biased model, then pseudo-attributes of the train set."""
        a = self.args
        biased = train_biased_model(
            self.model(seed + 10_000), (self.x, self.y), (self.val.x, self.val.y), lr=a.lr,
            weight_decay=a.weight_decay, steps=a.biased_steps, batch_size=a.batch_size,
            eval_every=max(1, a.biased_steps // 10), device=self.device,
            generator=torch.Generator().manual_seed(seed + 10_000), progress=self.progress)
        scores = model_scores(biased.model, self.train.x, device=self.device)
        pseudo = pseudo_attributes(scores, self.train.y, a.t, scores_are="logits")
        conflicting = self.train.a != self.train.y
        hits = int((conflicting & (pseudo == 1)).sum())
        info = {"biased_val_cba": biased.best_cba, "biased_best_step": biased.best_step,
                "pseudo_precision": hits / max(1, int((pseudo == 1).sum())),
                "pseudo_recall": hits / max(1, int(conflicting.sum()))}
        return pseudo, info


def _summary(runs: List[dict]) -> dict:
    out = {}
    for key in ("gba", "wga", "accuracy"):
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": float(vals.mean()),
                    "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def run_demo(args, progress_bar=None) -> dict:
    """Run every method for every seed; returns the results as a JSON-friendly dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; choose from {METHODS}")
    if args.seeds < 1 or args.steps < 1:
        raise SystemExit("--seeds and --steps must be >= 1")
    if not 0 < args.c <= 1:
        raise SystemExit(f"--c must be in (0, 1], got {args.c}")
    beta = 1.0 / args.c - 1.0 if args.beta is None else args.beta
    progress = progress_bar.update if progress_bar is not None else (lambda n: None)
    run = _Run(args, device, progress)
    known_bounds = beta_bounds(run.train.y, run.train.a, args.c)
    if not known_bounds.low <= beta <= known_bounds.high:
        raise SystemExit(f"--beta {beta} is outside [{known_bounds.low:.4g}, "
                         f"{known_bounds.high:.4g}] ({known_bounds.source})")
    results: Dict[str, dict] = {}
    labels = {"erm": "ERM", "resampling": "Group resampling (c=1, beta=0)",
              "gerne_known": f"GERNE known attr. (c={args.c:g}, beta={beta:.3g})",
              "gerne_unknown": "GERNE unknown attr."}
    for method in methods:
        runs = []
        for seed in range(args.seeds):
            if progress_bar is not None:
                progress_bar.set_description(f"{method} seed {seed}")
            if method == "erm":
                runs.append(run.train_erm(seed))
            elif method == "resampling":
                runs.append(run.train_gerne(seed, run.train.a, 1.0, 0.0))
            elif method == "gerne_known":
                runs.append(run.train_gerne(seed, run.train.a, args.c, beta, known_bounds))
            else:
                pseudo, info = run.pseudo_groups(seed)
                bounds = beta_bounds(run.train.y, pseudo, args.c, num_attributes=2)
                b = (args.beta_unknown if args.beta_unknown is not None
                     else args.beta_unknown_frac * bounds.high)
                r = run.train_gerne(seed, pseudo, args.c, b, bounds)
                r.update(info, beta_max=bounds.high)
                runs.append(r)
        if method == "gerne_unknown":
            betas = sorted({round(r["beta"], 3) for r in runs})
            labels[method] = (f"GERNE unknown attr. (t={args.t:g}, c={args.c:g}, beta="
                              f"{'/'.join(f'{b:.3g}' for b in betas)})")
        results[method] = {"label": labels[method], "runs": runs, **_summary(runs)}
    sweep = []
    if args.sweep > 0:
        hi = known_bounds.high if math.isfinite(known_bounds.high) else 2.0 / args.c
        for b in np.linspace(-1.0, 0.95 * hi, args.sweep):
            if progress_bar is not None:
                progress_bar.set_description(f"sweep beta={b:.2f}")
            r = run.train_gerne(0, run.train.a, args.c, float(b), known_bounds)
            sweep.append({"beta": float(b), "gba": r["gba"], "wga": r["wga"]})
    import gerne_kernels

    return {
        "config": {k: v for k, v in vars(args).items()},
        "device": str(device),
        "backends_available": list(gerne_kernels.available_backends()),
        "beta_known": beta,
        "beta_bounds_known": {"low": known_bounds.low, "high": known_bounds.high,
                              "source": known_bounds.source},
        "methods": results,
        "sweep": sweep,
    }


def total_steps(args) -> int:
    """Optimizer steps the progress bar counts."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    n = len(methods) * args.seeds * args.steps + max(0, args.sweep) * args.steps
    if "gerne_unknown" in methods:
        n += args.seeds * args.biased_steps
    return n


def format_table(result: dict) -> str:
    """The GBA / WGA table (percent, mean ± std over seeds)."""
    cfg = result["config"]
    rows = [(v["label"], v["gba"], v["wga"]) for v in result["methods"].values()]
    width = max([len("method")] + [len(r[0]) for r in rows])
    lines = [f"Colored MNIST (offline), minority {100 * cfg['minority']:g}%, "
             f"{cfg['seeds']} seed(s), {cfg['steps']} steps; test accuracy in %",
             f"{'method':<{width}}  {'GBA':>13}  {'WGA':>13}"]
    for label, gba, wga in rows:
        lines.append(f"{label:<{width}}  {100 * gba['mean']:6.2f} ± {100 * gba['std']:4.2f}"
                     f"  {100 * wga['mean']:6.2f} ± {100 * wga['std']:4.2f}")
    b = result["beta_bounds_known"]
    lines.append(f"beta bounds (known attributes): [{b['low']:.4g}, {b['high']:.4g}] "
                 f"({b['source']})")
    if "backends_available" in result:
        lines.append(f"GERNE backend: {cfg.get('backend', 'auto')} on {result.get('device')} "
                     f"(available: {', '.join(result['backends_available'])})")
    return "\n".join(lines)


def save_plot(result: dict, path: str) -> None:
    """Bar chart of GBA/WGA per method, and GBA against beta up to beta_max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"].values())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    pos = np.arange(len(methods))
    for off, key in ((-0.2, "gba"), (0.2, "wga")):
        ax.bar(pos + off, [100 * m[key]["mean"] for m in methods], 0.4,
               yerr=[100 * m[key]["std"] for m in methods], capsize=3, label=key.upper())
    ax.set_xticks(pos)
    ax.set_xticklabels([m["label"].replace(" (", "\n(") for m in methods], fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"minority {100 * result['config']['minority']:g}%, "
                 f"{result['config']['seeds']} seed(s)")
    ax = axes[1]
    if result["sweep"]:
        ax.plot([s["beta"] for s in result["sweep"]], [100 * s["gba"] for s in result["sweep"]],
                "o-", label="GBA")
        ax.plot([s["beta"] for s in result["sweep"]], [100 * s["wga"] for s in result["sweep"]],
                "s--", label="WGA")
        hi = result["beta_bounds_known"]["high"]
        if math.isfinite(hi):
            ax.axvline(hi, color="k", linestyle=":", label=f"beta_max = {hi:.3g}")
        ax.legend()
    ax.set_xlabel("beta")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"GERNE known attributes, c = {result['config']['c']:g}, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps(args), unit="step", dynamic_ncols=True)
    try:
        result = run_demo(args, bar)
    finally:
        if bar is not None:
            bar.close()
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(f"({result['seconds']:.0f} s)")
    if not args.no_plot:
        png = os.path.join(args.out, "demo.png")
        save_plot(result, png)
        print(f"plot: {png}")
    if args.json:
        path = os.path.join(args.out, args.json)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"json: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
