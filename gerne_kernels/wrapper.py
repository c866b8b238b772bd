"""GERNEWrapper: GERNE's extrapolated gradient fed to any torch optimizer.

    .grad <- g = (1 + beta) * g_lb - beta * g_b        (one fused pass: extrapolate_)
    base_optimizer.step()

The wrapper is a two-batch optimizer (two_batch.py: stash_biased(), the memory-lean mode,
GradScaler support, inf/NaN skipping and statistics) whose update is delegated: step() forms g
in .grad (reading g_b and g_lb once, writing g once, unscaling both under AMP) and calls
``base.step()``, unless an inf/NaN in either gradient skips the step. It shares
``param_groups`` with the base optimizer (each group gains a ``beta``), so LR and beta
schedules work through either object.
"""

import torch
from torch.optim import Optimizer

from . import sharding
from .buckets import PERMUTED, layout_of, same_strides
from .two_batch import TwoBatchOptimizer, check_beta_of, found_any


class GERNEWrapper(TwoBatchOptimizer):
    """Any torch.optim.Optimizer (SGD, AdamW, Lion from another package...) stepping along g.

    Args:
        base_optimizer: the optimizer instance to feed; it owns the hyperparameters and state.
        beta: the extrapolation factor, >= -1 (per param group, schedulable like lr).
        beta_bounds, backend, skip_nonfinite, grad_scaler, track_statistics, max_grad_norm:
            as for GERNE.

    ``defaults`` holds the base's defaults plus beta and beta_bounds, so that LR schedulers
    that look for momentum or betas there (OneCycleLR, CyclicLR) work through the wrapper.

    Usage per step, as for GERNE: ``zero_grad(); loss_b.backward(); stash_biased();
    loss_lb.backward(); step()`` (or ``backward_biased(loss_b); backward_less_biased(loss_lb)``).
    """

    def __init__(self, base_optimizer, beta=1.0, *, beta_bounds=None, backend="auto",
                 skip_nonfinite=None, grad_scaler=None, track_statistics=False,
                 max_grad_norm=None):
        sharding.refuse_zero_redundancy(type(self).__name__)  # before the check of its argument
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer instance, got "
                            f"{type(base_optimizer)}")
        if isinstance(base_optimizer, TwoBatchOptimizer):
            raise TypeError("base_optimizer is already a GERNE optimizer; wrap a plain optimizer "
                            "(torch.optim.SGD, AdamW, ...) instead")
        self.base = base_optimizer
        self._init_two_batch(backend, skip_nonfinite, grad_scaler, track_statistics,
                             max_grad_norm)
        # Adopts the base's group dicts (adding beta to each), then shares the very list, so
        # that groups the base gains later are seen here too.
        Optimizer.__init__(self, base_optimizer.param_groups,
                           dict(base_optimizer.defaults, beta=beta, beta_bounds=beta_bounds))
        self.param_groups = base_optimizer.param_groups

    def _op_scalars(self, group):
        return (group["beta"],)  # lr is the base optimizer's business

    _COPIED = TwoBatchOptimizer._COPIED + ("base",)

    def _check_group(self, group, where, read_tensors=True):
        for key in ("beta", "beta_bounds"):
            group.setdefault(key, self.defaults[key])  # groups the base gained without a beta
        check_beta_of(group, where, read_tensors)

    def add_param_group(self, param_group):
        if self.param_groups is not getattr(self.base, "param_groups", None):
            super().add_param_group(param_group)  # adopting the base's groups in __init__
            return
        if isinstance(param_group, dict):  # checked first: a refused group leaves no trace
            self._check_group({**self.defaults, **param_group},
                              f" (param group {len(self.param_groups)})")
        self.base.add_param_group(param_group)
        self._check_group(self.param_groups[-1], f" (param group {len(self.param_groups) - 1})")

    def zero_grad(self, set_to_none=True):
        """Clears .grad (through the base optimizer) and discards a pending biased gradient."""
        self.base.zero_grad(set_to_none=set_to_none)
        self._drop_stash()

    def _prepare_gradients(self):
        """g is written into .grad in place: .grad must exist (zeros when the less-biased batch
        did not reach the parameter) and be laid out as the op writes it (like its parameter,
        or contiguous for a parameter that is not dense)."""
        for p in self._params():
            grad = p.grad
            if grad is None:
                state = self.state.get(p)
                if state is not None and state.get("grad_b") is not None:
                    p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
                continue
            if grad.is_sparse:
                continue
            layout = layout_of(p)
            if layout == PERMUTED and not same_strides(grad, p):
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(grad)
            elif layout != PERMUTED and not grad.is_contiguous():
                p.grad = grad.contiguous()

    def _update(self, buckets, found_per_device):
        """Writes g into .grad, then runs ``base.step()`` unless the step is skipped (one host
        read of the flag: a skip changes nothing, .grad keeps g_lb, the base's parameters and
        state stay as they were)."""
        for bucket, impl in zip(buckets, self._implementations(buckets)):
            if not torch.is_tensor(bucket.scale_lb) and bucket.scale_b == 0 \
                    and bucket.scale_lb == 1:
                continue  # .grad already holds g (lean mode, or beta = 0 without a stash)
            impl.op("extrapolate_")(bucket.grads_lb, bucket.grads_b, bucket.grads_lb,
                                    found_per_device[bucket.device], scale_b=bucket.scale_b,
                                    scale_lb=bucket.scale_lb)
        if self.base.state and sharding.called_by_dcp_priming():
            return  # DCP primes this wrapper (its own state is empty), not a base with state
        if not self._may_skip() or not found_any(found_per_device.values()):
            self.base.step()

    # ----------------------------------------------------------------------------------------
    # Checkpoints: the base's state_dict in torch.optim's layout, plus the pending stash (as
    # "grad_b" state) and the skip count (in the param groups)

    def state_dict(self):
        base = self.base.state_dict()
        state = {index: dict(entry) for index, entry in base["state"].items()}
        for index, p in enumerate(self._params()):
            stash = self.state[p].get("grad_b") if p in self.state else None
            if stash is not None:
                state.setdefault(index, {})["grad_b"] = stash
        return self._with_checkpoint_extras({"state": state,
                                             "param_groups": base["param_groups"]})

    def load_state_dict(self, state_dict):
        """Loads a GERNEWrapper.state_dict(), also one of an older version (with a "base"
        entry)."""
        legacy = None
        if "base" in state_dict:  # older layout: {"base": ..., "grad_b": {index: g_b}, "gerne"}
            stashes = dict(state_dict.get("grad_b", {}))
            legacy = state_dict.get("gerne")
            base = state_dict["base"]
        elif "state" in state_dict and "param_groups" in state_dict:
            stashes, state = {}, {}
            for index, entry in state_dict["state"].items():
                entry = dict(entry)
                if "grad_b" in entry:
                    stashes[index] = entry.pop("grad_b")
                if entry:
                    state[index] = entry
            base = {"state": state, "param_groups": state_dict["param_groups"]}
        else:
            raise ValueError("GERNEWrapper.load_state_dict expects a GERNEWrapper.state_dict() "
                             "(torch.optim's layout: 'state' and 'param_groups'); got keys "
                             f"{sorted(state_dict)}")
        self.base.load_state_dict(base)
        self.param_groups = self.base.param_groups  # the base's load made a new list
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f" (param group {i})")
        self.state.clear()
        self._drop_stash()
        # The state's keys are the saved groups' "params" (indices; names under DCP's
        # set_optimizer_state_dict), in the order of this optimizer's parameters.
        saved = [i for group in base["param_groups"] for i in group["params"]]
        params = dict(zip(saved, self._params()))
        for index, grad_b in stashes.items():
            p = params[index] if index in params else self._params()[int(index)]
            self.state[p]["grad_b"] = grad_b.to(device=p.device, dtype=p.dtype)
        self._restore_checkpoint_extras(legacy)
