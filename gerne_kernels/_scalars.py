"""How lr, beta and the loss scales reach the fused ops: as floats, or as device tensors.

The ops' default overload takes lr, scale_b and scale_lb as floats, which a step reads on the
host; the ``.tensor`` overload takes float64 0-d tensors on the parameters' device, which the
kernel reads. A param group takes the tensor path as soon as any of its lr, its beta or the
step's inverse loss scales (a GradScaler's, which live on the device) is a tensor: the step then
forms every scalar with device ops (no host sync), a CUDA graph replays it with the values of the
moment, and torch.compile does not recompile when an lr or beta schedule moves them. Both paths
combine the scalars in float64 with the same operations, so they give the same bits:

    scale_b = -beta * inv_scale_b,   scale_lb = (1 + beta) * inv_scale_lb   (stash mode)
    scale_b = 0,                     scale_lb = inv_scale_lb               (no stash)
"""

import torch


def any_tensor(*values):
    return any(isinstance(v, torch.Tensor) for v in values)


def on_device(value, device):
    """value (a float or a one-element tensor) as a float64 0-d tensor on device. A float, or
    a CPU tensor, is filled in by a kernel (no copy, no sync; a captured CUDA graph keeps that
    value: put schedulable tensors on the parameters' device); a tensor on another accelerator
    is copied."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or torch.device(device).type == "cpu":
            return value.detach().to(device=device, dtype=torch.float64).reshape(())
        value = float(value)
    return torch.full((), float(value), dtype=torch.float64, device=device)


def zero_like(scale):
    """0 in the form of ``scale``: 0.0, or a float64 0-d zero on its device."""
    if isinstance(scale, torch.Tensor):
        return torch.zeros((), dtype=torch.float64, device=scale.device)
    return 0.0


def extrapolation_scales(beta, inv_scale_b, inv_scale_lb, has_stash, device=None):
    """(scale_b, scale_lb) as floats, or, with ``device``, as float64 0-d tensors on it."""
    if device is None:
        beta = float(beta)
        if not has_stash:
            return 0.0, inv_scale_lb
        return -beta * inv_scale_b, (1.0 + beta) * inv_scale_lb
    inv_scale_lb = on_device(inv_scale_lb, device)
    if not has_stash:
        return torch.zeros((), dtype=torch.float64, device=device), inv_scale_lb
    beta = on_device(beta, device)
    return -beta * on_device(inv_scale_b, device), (1.0 + beta) * inv_scale_lb
