"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") fed g:

    g <- -g (maximize);  c = beta1 * m + (1 - beta1) * g;
    p <- p * (1 - lr * wd) - lr * sign(c);   m <- beta2 * m + (1 - beta2) * g

sign(0) = 0, as torch.sign. State: ``exp_avg`` (m) per parameter, zeros before its first step.
"""

import torch

from .. import hyperparameters as hp
from .base_optimizer import TORCH_FLAGS, BaseOptimizer


class Lion(BaseOptimizer):
    name = "lion"
    op = "lion_step_"
    defaults = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, **TORCH_FLAGS)

    def check(self, group, where, read_tensors=True):
        super().check(group, where, read_tensors)
        hp.nonnegative(group, "weight_decay", where)
        hp.check_betas(group, where, what="Lion's interpolation and momentum decays")

    def update(self, call):
        bucket, group = call.bucket, call.bucket.group
        states = call.states()
        for p, state in zip(bucket.params, states):
            if "exp_avg" not in state:
                call.new_state(p, exp_avg=torch.zeros_like(
                    p, memory_format=torch.preserve_format))
        beta1, beta2 = group["betas"]
        call.impl.op(self.op)(
            bucket.p, bucket.grads_b, bucket.grads_lb,
            bucket.operands([s["exp_avg"] for s in states], written=True),
            call.found_inf, beta1=float(beta1), beta2=float(beta2),
            weight_decay=group["weight_decay"], maximize=group["maximize"], **call.scalars())
