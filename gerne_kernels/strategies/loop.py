"""The one training loop every strategy runs in, with validation-based checkpoint selection
and resumable checkpoints.

For ``steps`` steps: the strategy's sampler draws index tuples, the data source turns them
into batches on the device, ``strategy.step`` updates the model; the learning rate follows
a cosine decay to 0 over the run (or stays constant). Every ``eval_every`` steps and after
the last, the model is evaluated on the validation source and the state with the best
``select`` metric (GBA, WGA or CBA; the earliest on ties) is kept; ``select="last"`` keeps
the final state. The kept state is loaded into the model at the end.

Checkpoints (``checkpoint=PATH``) are written after every evaluation, and once right after
``strategy.prepare`` (so a biased model or JTT's first stage is not trained twice). A
checkpoint holds the model, optimizer, LR schedule, sampler generator, the strategy's state,
the kept best state and the history; it is written to ``PATH.tmp`` and renamed over
``PATH`` (``os.replace``, atomic), so a run killed while saving leaves the previous
checkpoint intact and resumes from it. A run resumed from a checkpoint continues exactly as
the uninterrupted run would (same batches, same updates), since every random draw comes
from the saved generator.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..metrics import class_balanced_accuracy, group_metrics
from .base import StepContext, Strategy, TrainSetup

__all__ = ["LoopSettings", "TrainResult", "train", "evaluate", "SELECT_METRICS"]

SELECT_METRICS = ("gba", "wga", "cba", "last")
CHECKPOINT_FORMAT = 1


@dataclass
class LoopSettings:
    """How long to train, when to validate, what to keep."""

    steps: int
    eval_every: Optional[int] = None    # None: validate once, after the last step
    select: str = "last"                # "gba", "wga", "cba" or "last"
    schedule: str = "cosine"            # "cosine" (to 0 over the run) or "constant"
    seed: int = 0                       # the samplers' generator
    checkpoint: Optional[str] = None    # path; an existing checkpoint is resumed
    stop_after: Optional[int] = None    # return after this many evaluations in this call

    def __post_init__(self):
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.eval_every is not None and int(self.eval_every) < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every!r}")
        if self.select not in SELECT_METRICS:
            raise ValueError(f"select must be one of {SELECT_METRICS}, got {self.select!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")

    def eval_steps(self) -> List[int]:
        every = int(self.eval_every or self.steps)
        return sorted(set(range(every, int(self.steps) + 1, every)) | {int(self.steps)})


@dataclass
class TrainResult:
    """The trained model (the kept state loaded), where it was kept, and every evaluation."""

    model: torch.nn.Module
    best_step: int
    best_value: float
    history: List[Dict] = field(default_factory=list)  # {"step", "gba", "wga", "cba", ...}
    steps_done: int = 0
    finished: bool = True
    seconds: float = 0.0


def evaluate(model: torch.nn.Module, source, device, amp_dtype=None) -> Dict:
    """GBA, WGA, CBA, accuracy and per-group accuracy of ``model`` on ``source``."""
    logits = source.logits(model, device, amp_dtype)
    m = group_metrics(logits, source.labels, source.attributes)
    out = m.as_dict()
    out["cba"] = class_balanced_accuracy(logits, source.labels)
    return out


def _value(metrics: Dict, select: str) -> float:
    return metrics[select] if select != "last" else 0.0


def _save(path: str, payload: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: the old checkpoint stays valid until this instant


def _load(path: str, device) -> Dict:
    from ..bounds import BetaBounds

    torch.serialization.add_safe_globals([BetaBounds])  # kept in GERNE's param groups
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path!r} cannot be read ({exc}); delete it to start "
                           "over") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path!r} is not a checkpoint of this loop (format "
                           f"{CHECKPOINT_FORMAT}); delete it or pass another path")
    return payload


def _scheduler(optimizer, settings: LoopSettings):
    if settings.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = int(settings.steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


def train(model: torch.nn.Module, strategy: Strategy, setup: TrainSetup,
          settings: LoopSettings, on_step: Optional[Callable[[int, torch.nn.Module], None]] = None,
          on_eval: Optional[Callable[[Dict], None]] = None) -> TrainResult:
    """Train ``model`` with ``strategy`` (see the module docstring)."""
    start_time = time.perf_counter()
    device = torch.device(setup.device)
    model.to(device)
    resumed = None
    if settings.checkpoint and os.path.exists(settings.checkpoint):
        resumed = _load(settings.checkpoint, device)
        if resumed["steps"] != int(settings.steps):
            raise ValueError(f"checkpoint {settings.checkpoint!r} is of a run of "
                             f"{resumed['steps']} steps, this one has {settings.steps}; "
                             "pass the same settings or another checkpoint path")
        strategy.load_state_dict(resumed["strategy"])
    strategy.prepare(setup)
    optimizer = strategy.optimizer(model.parameters(), setup.optimizer)
    scheduler = _scheduler(optimizer, settings)
    generator = torch.Generator().manual_seed(int(settings.seed))
    best_state, best_step, best_value, history, step = None, 0, -math.inf, [], 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["generator"].cpu())
        step, history = resumed["step"], list(resumed["history"])
        best_step, best_value = resumed["best_step"], resumed["best_value"]
        best_state = resumed["best_state"]

    def checkpoint():
        if settings.checkpoint:
            _save(settings.checkpoint, {
                "format": CHECKPOINT_FORMAT, "steps": int(settings.steps), "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "strategy": strategy.state_dict(), "best_state": best_state,
                "best_step": best_step, "best_value": best_value, "history": history})

    if resumed is None:
        checkpoint()
    ctx = StepContext(model, optimizer, setup.amp_dtype)
    evaluations = 0
    model.train()
    for stop in [s for s in settings.eval_steps() if s > step]:
        indices = strategy.sampler(setup.train.labels, setup.train.attributes, setup.batch_size,
                                   stop - step, generator)
        for batches in setup.train.batches(indices, device):
            strategy.step(ctx, batches)
            scheduler.step()
            step += 1
            setup.progress(1)
            if on_step is not None:
                on_step(step, model)
        metrics = evaluate(model, setup.val, device, setup.amp_dtype)
        metrics["step"] = step
        history.append({k: metrics[k] for k in ("step", "gba", "wga", "cba", "accuracy")})
        value = _value(metrics, settings.select)
        if settings.select == "last" or value > best_value:
            best_value, best_step = value, step
            best_state = copy.deepcopy(model.state_dict()) if settings.select != "last" else None
        checkpoint()
        if on_eval is not None:
            on_eval(metrics)
        evaluations += 1
        if settings.stop_after is not None and evaluations >= settings.stop_after \
                and step < settings.steps:
            return TrainResult(model, best_step, best_value, history, step, False,
                               time.perf_counter() - start_time)
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(model, best_step, best_value, history, step, True,
                       time.perf_counter() - start_time)
