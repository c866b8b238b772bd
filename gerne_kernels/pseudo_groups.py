"""Unknown attributes: pseudo-groups from a biased model (Section 4.2, Algorithm 2).

1. Train a biased model ``f~`` with plain ERM on class-balanced batches, keeping the
   checkpoint with the best class-balanced accuracy (CBA) on validation data, which
   needs no attribute labels (:func:`train_biased_model`).
2. For each class y rank the training samples of ``X_y`` by the biased model's
   confidence in their own class, ``softmax(f~(x))_y``; the ``floor(t * |X_y|)`` least
   confident samples get pseudo-attribute 1 (bias-conflicting, "hard"), the others 0
   (:func:`pseudo_attributes`, ``t in (0, 1/2]``).
3. Run Algorithm 1 with these pseudo-groups (A = 2).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .metrics import class_balanced_accuracy
from .sampler import ClassBalancedSampler, _as_long_1d

__all__ = ["pseudo_attributes", "train_biased_model", "BiasedModel", "model_scores"]


def _looks_like_probabilities(scores: torch.Tensor) -> bool:
    if scores.numel() == 0 or bool((scores < 0).any()) or bool((scores > 1).any()):
        return False
    return bool(torch.allclose(scores.sum(dim=1), torch.ones(scores.shape[0], dtype=scores.dtype),
                               atol=1e-3, rtol=0))


def pseudo_attributes(scores, labels, t: float, scores_are: str = "auto") -> torch.Tensor:
    """Pseudo-attributes of Algorithm 2: 1 for the ``floor(t * |X_y|)`` least confident
    samples of each class y, 0 for the others.

    Parameters
    ----------
    scores: (N x K) logits or class probabilities of the biased model.
    labels: (N,) class labels.
    t: share of each class marked as bias-conflicting, ``t in (0, 1/2]``.
    scores_are: "logits" (confidence = softmax), "probs" (used as given) or "auto":
        probabilities when every row is in [0, 1] and sums to 1 (within 1e-3),
        logits otherwise.

    Logits are ranked in float64 by the margin ``s_y - logsumexp_{j != y} s_j``, a
    monotone transform of ``softmax_y`` that does not saturate where the softmax rounds
    to 1.0; ties keep the sample order. Returns int64 (N,).
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) <= 0.5):
        raise ValueError(f"t must be a number in (0, 1/2], got {t!r}")
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    y = _as_long_1d(labels, "labels")
    if s.dim() != 2:
        raise ValueError(f"scores must be (N x K), got shape {tuple(s.shape)}")
    if s.shape[0] != y.numel():
        raise ValueError(f"scores has {s.shape[0]} rows but labels has {y.numel()} entries")
    if y.numel() and int(y.max()) >= s.shape[1]:
        raise ValueError(f"labels contain class {int(y.max())} but scores has {s.shape[1]} columns")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain inf or NaN")
    if scores_are == "auto":
        scores_are = "probs" if _looks_like_probabilities(s) else "logits"
    if scores_are == "logits":
        # log softmax_y = -log1p(sum_{j != y} exp(s_j - s_y)) is decreasing in the margin
        # logsumexp_{j != y} s_j - s_y, which keeps its precision where softmax_y rounds to 1
        others = s.scatter(1, y.view(-1, 1), -math.inf)
        own = s.gather(1, y.view(-1, 1)).view(-1) - torch.logsumexp(others, dim=1)
    elif scores_are == "probs":
        if bool((s < 0).any()) or bool((s > 1).any()):
            raise ValueError("scores_are='probs' but scores are outside [0, 1]")
        own = s.gather(1, y.view(-1, 1)).view(-1)
    else:
        raise ValueError(f"scores_are must be 'logits', 'probs' or 'auto', got {scores_are!r}")
    out = torch.zeros(y.numel(), dtype=torch.long)
    for k in torch.unique(y).tolist():
        idx = torch.nonzero(y == k).view(-1)
        n_hard = math.floor(float(t) * idx.numel())
        if n_hard:
            order = torch.argsort(own[idx], stable=True)
            out[idx[order[:n_hard]]] = 1
    return out


@torch.no_grad()
def model_scores(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096,
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The model's logits for inputs ``x`` (eval mode, in chunks), on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class BiasedModel:
    """Result of :func:`train_biased_model`: the model with its best checkpoint loaded."""

    model: torch.nn.Module
    state_dict: dict
    best_cba: float
    best_step: int
    history: List[Tuple[int, float]] = field(default_factory=list)  # (step, validation CBA)


def _tensors(data, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(
            isinstance(t, torch.Tensor) for t in data[:2]):
        x, y = data[0], data[1]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        return x, _as_long_1d(y, f"{name} labels")
    raise TypeError(f"{name} must be a tuple (x, y[, a]) of tensors, e.g. a GroupTensors; "
                    f"got {type(data).__name__}")


def train_biased_model(model: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
                       train, val, *, lr: float, weight_decay: float, steps: int,
                       batch_size: int, lr_factor: float = 0.1, weight_decay_factor: float = 2.0,
                       momentum: float = 0.9, eval_every: int = 50,
                       generator: Optional[torch.Generator] = None,
                       device: Union[str, torch.device, None] = None,
                       progress: Optional[Callable[[int], None]] = None) -> BiasedModel:
    """Step 1 of Algorithm 2: ERM on class-balanced batches, best validation CBA kept.

    ``lr`` and ``weight_decay`` are the *base* configuration (the one used for the
    debiased model); as in the paper the biased model trains with a tenth of the
    learning rate and twice the weight decay (``lr_factor=0.1``,
    ``weight_decay_factor=2.0``), by SGD with momentum.

    ``model`` is a module (trained in place) or a zero-argument factory returning one.
    ``train`` and ``val`` are tuples ``(x, y[, a])`` of tensors (attributes are never
    used). Every ``eval_every`` steps (and after the last) the class-balanced accuracy
    on ``val`` is measured; the state_dict with the best CBA (earliest on ties) is
    loaded back into the model and returned. ``progress(n)`` is called with the
    number of steps done since the last call (e.g. ``tqdm.update``).
    """
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError("model must be an nn.Module or a callable returning one")
        model = model()
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the model factory must return an nn.Module")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if int(eval_every) < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    x, y = _tensors(train, "train")
    x_val, y_val = _tensors(val, "val")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    sampler = ClassBalancedSampler(y, batch_size, generator=generator, steps_per_epoch=int(steps))
    opt = torch.optim.SGD(model.parameters(), lr=lr * lr_factor, momentum=momentum,
                          weight_decay=weight_decay * weight_decay_factor)
    best_cba, best_step, best_state, history = -math.inf, 0, None, []
    model.train()
    for step, idx in enumerate(sampler, start=1):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
        opt.step()
        if progress is not None:
            progress(1)
        if step % eval_every == 0 or step == steps:
            cba = class_balanced_accuracy(model_scores(model, x_val, device=device), y_val)
            history.append((step, cba))
            if cba > best_cba:
                best_cba, best_step = cba, step
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return BiasedModel(model=model, state_dict=best_state, best_cba=best_cba,
                       best_step=best_step, history=history)
