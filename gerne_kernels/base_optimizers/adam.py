"""Adam and AdamW (torch.optim.Adam / AdamW: amsgrad, maximize, coupled or decoupled weight
decay) fed g, with t the parameter's step count after this step:

    g <- -g (maximize);  p <- p * (1 - lr * wd) (AdamW) or g <- g + wd * p (Adam);
    m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g * g;  vmax <- max(vmax, v);
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)

State per parameter, created on its first step: ``step`` (a float32 0-d tensor on the
parameter's device, advanced by the op itself: no host sync), ``exp_avg``, ``exp_avg_sq`` and,
with amsgrad, ``max_exp_avg_sq``. A checkpoint whose ``step`` is a Python number (older
torch.optim) is read as such a tensor.
"""

import torch

from .. import hyperparameters as hp
from .base_optimizer import TORCH_FLAGS, BaseOptimizer


class Adam(BaseOptimizer):
    """Adam, or AdamW (``decoupled``): as in torch, AdamW's groups hold
    decoupled_weight_decay=True, which it does not take as an argument, and Adam takes
    decoupled_weight_decay (default False; True is AdamW's update)."""
    op = "adam_step_"

    def __init__(self, name, decoupled, weight_decay):
        self.name = name
        self.defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                             amsgrad=False, maximize=False, decoupled_weight_decay=decoupled,
                             **TORCH_FLAGS)
        self.fixed = {"decoupled_weight_decay": True} if decoupled else {}

    def check(self, group, where, read_tensors=True):
        super().check(group, where, read_tensors)
        hp.nonnegative(group, "weight_decay", where)
        hp.nonnegative(group, "eps", where)
        hp.check_betas(group, where)

    def load_state(self, p, state):
        """A "step" that is a Python number (an older torch.optim checkpoint) becomes a float32
        tensor, as torch.optim's Adam makes it on load; on p's device."""
        step = state.get("step")
        if step is not None and not isinstance(step, torch.Tensor):
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        elif step is not None and step.device != p.device:
            state["step"] = step.to(p.device)

    def update(self, call):
        bucket, group = call.bucket, call.bucket.group
        amsgrad = group["amsgrad"]
        states = call.states()
        for p, state in zip(bucket.params, states):
            step = state.get("step")
            if step is None:
                call.new_state(p, step=torch.zeros((), dtype=torch.float32, device=p.device),
                               exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                               exp_avg_sq=torch.zeros_like(
                                   p, memory_format=torch.preserve_format))
            elif type(step) is not torch.Tensor:  # set by hand, or an older pickle
                self.load_state(p, state)
            if amsgrad and "max_exp_avg_sq" not in state:
                call.new_state(p, max_exp_avg_sq=torch.zeros_like(
                    p, memory_format=torch.preserve_format))
        beta1, beta2 = group["betas"]
        call.impl.op(self.op)(
            bucket.p, bucket.grads_b, bucket.grads_lb,
            bucket.operands([s["exp_avg"] for s in states], written=True),
            bucket.operands([s["exp_avg_sq"] for s in states], written=True),
            bucket.operands([s["max_exp_avg_sq"] for s in states], written=True)
            if amsgrad else [],
            [s["step"] for s in states], call.found_inf, beta1=float(beta1), beta2=float(beta2),
            eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled_weight_decay=bool(self.fixed.get("decoupled_weight_decay",
                                                       group["decoupled_weight_decay"])),
            **call.scalars())
