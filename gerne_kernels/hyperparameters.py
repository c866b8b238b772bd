"""Checks of hyperparameters, as torch.optim makes them, with errors that name the
hyperparameter and the fix. Shared by the two-batch core (beta, lr) and the base optimizers.

lr and beta may be one-element tensors. They are read only with ``read_tensors``: a step leaves
them unread, to stay free of host syncs and graph breaks (they are checked when given).
"""

import math
import numbers

import torch


def real(name, value, where, read_tensors=True):
    """value as a float; a TypeError naming the hyperparameter if it is not a real number.
    A one-element tensor gives None unless read_tensors (a host sync for a device tensor, a
    graph break under torch.compile)."""
    if type(value) is float:  # the common case, answered before the slower checks
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value) if read_tensors else None
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"{name}{where} must be a real number (a float or a one-element tensor), "
                    f"got {value!r}")


def nonnegative(group, name, where, label=None, read_tensors=True):
    """group[name] as a float (None for an unread tensor), which must be >= 0."""
    value = real(name, group[name], where, read_tensors)
    if value is not None and not 0.0 <= value:
        raise ValueError(f"Invalid {label or name}{where} = {group[name]}: use {name} >= 0")
    return value


def check_lr(group, where, read_tensors=True):
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr{where} must be a float or a one-element tensor, got a tensor of "
                         f"shape {tuple(lr.shape)}")
    nonnegative(group, "lr", where, "learning rate lr", read_tensors)


def check_betas(group, where, what="Adam's moment decays"):
    """betas = (beta1, beta2), each in [0, 1): the base optimizer's decays, not GERNE's beta."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= real(f"betas[{i}]", b, where) < 1.0:
            raise ValueError(f"Invalid betas[{i}]{where} = {b}: use 0 <= b < 1 (these are "
                             f"{what}, not GERNE's extrapolation beta)")


def check_beta(beta, bounds, where, read_tensors=True):
    """GERNE's extrapolation factor: finite, >= -1, inside ``bounds`` when given."""
    if isinstance(beta, torch.Tensor) and beta.numel() != 1:
        raise ValueError(f"beta{where} must be a float or a one-element tensor, got a tensor of "
                         f"shape {tuple(beta.shape)}")
    beta = real("beta", beta, where, read_tensors)
    if beta is None:  # a tensor: checked when given, not at every step
        return
    if math.isnan(beta):
        raise TypeError(f"beta{where} must be a real number, got {beta!r}")
    if math.isinf(beta):
        raise ValueError(f"beta{where} = {beta} is not finite: g = (1 + beta) g_lb - beta g_b "
                         "would be inf or NaN. Use a finite beta >= -1.")
    if beta < -1:
        raise ValueError(
            f"beta{where} = {beta} is below -1: the less-biased batch would get a negative "
            "weight (1 + beta). Use beta >= -1 (beta = -1 is plain class-balanced ERM).")
    if bounds is not None:
        try:
            lo, hi = (real("beta_bounds", b, where) for b in bounds)
        except (TypeError, ValueError):
            lo = hi = math.nan
        if not lo <= hi:
            raise ValueError(f"beta_bounds{where} must be a pair (low, high) of real numbers "
                             f"with low <= high, e.g. gk.beta_bounds(...); got {bounds!r}")
        if not lo <= beta <= hi:
            source = getattr(bounds, "source", "the beta_bounds argument")
            raise ValueError(
                f"beta{where} = {beta} is outside [{lo:.4g}, {hi:.4g}] (from {source}); "
                "beyond these bounds some group's expected loss weight turns negative and "
                "training diverges. Choose beta inside them.")
