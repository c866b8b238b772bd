"""Per-step gradient statistics: ||g_b||, ||g_lb||, ||g|| and cos(g_b, g_lb), kept on the device.

They come from the sums that the ``scan_`` op adds up in its one read of both gradients, over
all parameters, with the gradients as they lie in memory (scaled by an AMP loss scale S_b, S_lb,
or not: inv_b = 1 / S_b, inv_lb = 1 / S_lb) and g formed per bucket with that bucket's scales
(g = scale_lb * g_lb + scale_b * g_b, the scales holding beta and the inverse loss scales)::

    sums = [sum g^2, sum g_b^2, sum g_lb^2, sum g_b * g_lb]        (float64)

    ||g_b||        = inv_b * sqrt(sum g_b^2)
    ||g_lb||       = inv_lb * sqrt(sum g_lb^2)
    ||g||          = sqrt(sum g^2)
    cos(g_b, g_lb) = inv_b * inv_lb * sum g_b g_lb / (||g_b|| * ||g_lb||)   (0 when a norm is 0)

Nothing is copied to the host, so recording the statistics costs no synchronisation. The values
are float32 tensors (float64 for float64 gradients).
"""

import dataclasses

import torch


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


def statistics_from_sums(sums_per_device, inv_scale_b, inv_scale_lb, dtype=torch.float32):
    """The GradientStatistics of scan_'s sums (one float64 [4] tensor per device)."""
    total = sums_per_device[0]
    for other in sums_per_device[1:]:
        total = total + other.to(total.device, non_blocking=True)
    sq_g, sq_b, sq_lb, dot = total.unbind()
    norm_b = sq_b.sqrt() * inv_scale_b
    norm_lb = sq_lb.sqrt() * inv_scale_lb
    dot = dot * (inv_scale_b * inv_scale_lb)
    denominator = norm_b * norm_lb
    cos = torch.where(denominator == 0, torch.zeros_like(dot), dot / denominator)
    return GradientStatistics(norm_b=norm_b.to(dtype), norm_lb=norm_lb.to(dtype),
                              norm=sq_g.clamp_min(0).sqrt().to(dtype),
                              cos=cos.clamp(-1, 1).to(dtype))
