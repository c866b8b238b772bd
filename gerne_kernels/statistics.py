"""Per-step gradient statistics: ||g_b||, ||g_lb||, ||g|| and cos(g_b, g_lb), kept on the device.

Over all parameters, with the gradients as they lie in memory (scaled by an AMP loss scale S_b,
S_lb, or not: inv_b = 1 / S_b, inv_lb = 1 / S_lb) and the extrapolated gradient of each bucket
g = a * g_lb + b * g_b (a = scale_lb = (1 + beta) * inv_lb, b = scale_b = -beta * inv_b)::

    ||g_b||^2      = sum inv_b^2 * <g_b, g_b>
    ||g_lb||^2     = sum inv_lb^2 * <g_lb, g_lb>
    <g_b, g_lb>    = sum inv_b * inv_lb * <g_b, g_lb>
    ||g||^2        = sum a^2 <g_lb, g_lb> + b^2 <g_b, g_b> + 2 a b <g_b, g_lb>
    cos(g_b, g_lb) = <g_b, g_lb> / (||g_b|| * ||g_lb||)      (0 when either norm is 0)

One reduction pass per bucket reads each gradient once for its norm (torch._foreach_norm, one
multi-tensor kernel) and once more for the per-tensor dot product; nothing is copied to the host,
so recording the statistics costs no synchronisation. Sums are float32 (float64 for float64
gradients); half and bfloat16 gradients are accumulated in float32.
"""

import dataclasses

import torch

_REDUCED = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class GradientStatistics:
    """One step's statistics, each a 0-d tensor on the parameters' (first) device.

    Read them with ``float(stats.cos)`` or ``stats.as_floats()`` when needed (that reads the
    device); a step skipped for inf/NaN gradients records inf or NaN here.
    """
    norm_b: torch.Tensor
    norm_lb: torch.Tensor
    norm: torch.Tensor
    cos: torch.Tensor

    def as_floats(self):
        """The four values as Python floats (one host read each)."""
        return {field.name: float(getattr(self, field.name))
                for field in dataclasses.fields(self)}


def _squared_norms(grads):
    dtype = torch.float32 if grads[0].dtype in _REDUCED else None
    return torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)).square().sum()


def _dot(a, b):
    if a.dtype in _REDUCED:
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


class StatisticsAccumulator:
    """Sums the four quantities over buckets of (g_b, g_lb) lists, then forms the statistics."""

    def __init__(self):
        self._sums = {}  # device -> tensor [||g_b||^2, ||g_lb||^2, <g_b, g_lb>, ||g||^2]

    def add(self, grads_b, grads_lb, *, inv_scale_b, inv_scale_lb, scale_b, scale_lb):
        """Adds one bucket (same device and dtype) of gradients as they lie in memory."""
        if not grads_b:
            return
        sq_b, sq_lb = _squared_norms(grads_b), _squared_norms(grads_lb)
        dot = torch.stack([_dot(b, lb) for b, lb in zip(grads_b, grads_lb)]).sum()
        # The scales may be float64 device tensors (_scalars.py): the sums keep sq_b's dtype.
        terms = torch.stack([
            sq_b * inv_scale_b ** 2,
            sq_lb * inv_scale_lb ** 2,
            dot * (inv_scale_b * inv_scale_lb),
            sq_lb * scale_lb ** 2 + sq_b * scale_b ** 2 + dot * (2 * scale_lb * scale_b),
        ]).to(sq_b.dtype)
        device = grads_b[0].device
        if device in self._sums:
            self._sums[device] = self._sums[device] + terms.to(self._sums[device].dtype)
        else:
            self._sums[device] = terms

    def result(self):
        """The GradientStatistics of everything added, or None when nothing was."""
        if not self._sums:
            return None
        sums = list(self._sums.values())
        total = sums[0]
        for other in sums[1:]:
            total = total + other.to(device=total.device, dtype=total.dtype, non_blocking=True)
        sq_b, sq_lb, dot, sq_g = total.unbind()
        norm_b, norm_lb = sq_b.sqrt(), sq_lb.sqrt()
        denominator = norm_b * norm_lb
        cos = torch.where(denominator == 0, torch.zeros_like(dot), dot / denominator)
        return GradientStatistics(norm_b=norm_b, norm_lb=norm_lb,
                                  norm=sq_g.clamp_min(0).sqrt(), cos=cos.clamp(-1, 1))
