"""SGD (torch.optim.SGD: momentum, dampening, nesterov, weight decay, maximize) fed g.

    g <- -g (maximize);  g <- g + wd * p;
    buf <- g (first step) or momentum * buf + (1 - dampening) * g;
    g <- g + momentum * buf (nesterov) or buf;   p <- p - lr * g

State: ``momentum_buffer`` per parameter, created on its first step (with momentum only).
torch.optim.SGD takes no ``capturable`` flag; neither does this (the step is capturable anyway).
"""

import torch

from .. import hyperparameters as hp
from .base_optimizer import TORCH_FLAGS, BaseOptimizer


class SGD(BaseOptimizer):
    name = "sgd"
    op = "sgd_step_"
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                    maximize=False,
                    **{k: v for k, v in TORCH_FLAGS.items() if k != "capturable"})

    def check(self, group, where, read_tensors=True):
        super().check(group, where, read_tensors)
        hp.nonnegative(group, "weight_decay", where)
        momentum = hp.nonnegative(group, "momentum", where)
        dampening = hp.real("dampening", group["dampening"], where)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov=True{where} requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']}, "
                             f"dampening={group['dampening']})")

    def update(self, call):
        bucket, group = call.bucket, call.bucket.group
        op = call.impl.op(self.op)
        hyper = dict(momentum=float(group["momentum"]), dampening=group["dampening"],
                     nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                     maximize=group["maximize"], **call.scalars())
        if hyper["momentum"] == 0:
            op(bucket.p, bucket.grads_b, bucket.grads_lb, [], call.found_inf,
               is_first_step=False, **hyper)
            return
        buffers = [s.get("momentum_buffer") if s else None for s in bucket.states]
        if all(b is not None for b in buffers):  # every buffer exists: one call on the whole bucket
            op(bucket.p, bucket.grads_b, bucket.grads_lb,
               bucket.operands(buffers, written=True), call.found_inf, is_first_step=False,
               **hyper)
            return
        # A buffer's first step sets buf = g (nothing to read): one call per kind of tensor.
        old, new = [], []
        for i, buffer in enumerate(buffers):
            (new if buffer is None else old).append(i)
        for p in (bucket.params[i] for i in new):
            call.new_state(p, momentum_buffer=torch.empty_like(
                p, memory_format=torch.preserve_format))
        for indices, first in ((old, False), (new, True)):
            if not indices:
                continue
            buffers = bucket.operands([call.state[bucket.params[i]]["momentum_buffer"]
                                       for i in indices], written=True, indices=indices)
            op([bucket.p[i] for i in indices], [bucket.grads_b[i] for i in indices],
               [bucket.grads_lb[i] for i in indices], buffers, call.found_inf,
               is_first_step=first, **hyper)
