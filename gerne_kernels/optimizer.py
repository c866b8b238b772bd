"""GERNE: a base optimizer (SGD, Adam, AdamW, Lion) stepping along the extrapolated gradient

    g = (1 + beta) * g_lb - beta * g_b

with torch.optim's semantics, in one fused pass over the parameters where a fused backend is
available. The two-batch machinery (stash and lean modes, inf/NaN skip, AMP, statistics) is
``two_batch.py``'s; the base optimizers are entries of ``base_optimizers``; the math lives in
the ops of ``_ops.py`` (reference: ``_reference.py``).
"""

from .base_optimizers import REGISTRY
from .base_optimizers.base_optimizer import UpdateCall
from .two_batch import TwoBatchOptimizer, check_beta_of, found_any


class GERNE(TwoBatchOptimizer):
    """A base optimizer (torch.optim.SGD / Adam / AdamW, or Lion) fed GERNE's extrapolated
    gradient.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        optimizer: "sgd", "adam", "adamw" or "lion"; its hyperparameters are those of
            torch.optim (Lion: lr=1e-4, betas=(0.9, 0.99), weight_decay=0, maximize).
        beta: the extrapolation factor, >= -1 (per param group, schedulable like lr). lr and
            beta may be one-element tensors, changed in place by schedules: on the parameters'
            device they keep a step free of host syncs, let a captured CUDA graph follow them
            and never recompile a compiled step (there is no ``capturable`` flag: the cuda and
            triton backends are always capturable). Tensors are range-checked when given, not
            at each step.
        beta_bounds: optional (low, high), e.g. ``gk.beta_bounds(...)``; beta must stay inside.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        skip_nonfinite: None (the default, as torch.optim): a step driven by a GradScaler that
            meets inf or NaN in g_b or g_lb changes nothing and makes the scaler back off.
            True: every step checks both gradients first (one more read of them) and skips,
            counted in ``skipped_steps``. False: no check of its own.
        grad_scaler: the torch.amp.GradScaler whose ``scaler.step(opt)`` drives this optimizer,
            if any; needed in the stash mode so that the stash is unscaled and an inf/NaN in it
            makes the scaler back off.
        track_statistics: record ||g_b||, ||g_lb||, ||g|| and cos(g_b, g_lb) at each step
            (stash mode), on the device without a host sync; read ``opt.statistics``.
        max_grad_norm: clip g with clip_grad_norm_'s semantics (total 2-norm of g over all
            parameters, unscaled under AMP; coefficient min(1, max / (norm + 1e-6))) inside
            the step, from the same read of both gradients as the inf/NaN check; the pre-clip
            norm is ``opt.grad_norm`` after the step. None: no clipping.
        foreach, fused, capturable, differentiable: torch.optim's flags, accepted; the step is
            always one fused, capturable pass; differentiable=True is refused.

    Usage per step: ``zero_grad(); loss_b.backward(); stash_biased(); loss_lb.backward();
    step()``; in the memory-lean mode ``zero_grad(); backward_biased(loss_b);
    backward_less_biased(loss_lb); step()``; in the one-backward mode (stock training loops)
    ``opt.extrapolated_loss(loss_b, loss_lb).backward(); step()``.
    """

    def __init__(self, params, optimizer="sgd", *, beta=1.0, beta_bounds=None, backend="auto",
                 skip_nonfinite=None, grad_scaler=None, track_statistics=False,
                 max_grad_norm=None, **hyperparameters):
        if optimizer not in REGISTRY:
            raise ValueError(f"optimizer must be one of {sorted(REGISTRY)}, got {optimizer!r}")
        self.base_optimizer = REGISTRY[optimizer]
        known = self.base_optimizer.defaults
        unknown = sorted(set(hyperparameters) - set(known) | (
            set(hyperparameters) & set(self.base_optimizer.fixed)))
        if unknown:
            raise TypeError(f"GERNE(optimizer={optimizer!r}) got unexpected hyperparameters "
                            f"{unknown}; the accepted ones are "
                            f"{sorted(set(known) - set(self.base_optimizer.fixed))} "
                            "(as in torch.optim)")
        defaults = dict(known, **hyperparameters)
        defaults.update(beta=beta, beta_bounds=beta_bounds)
        self._init_two_batch(backend, skip_nonfinite, grad_scaler, track_statistics,
                             max_grad_norm)
        self._check_group(defaults, "")
        super().__init__(params, defaults)

    _COPIED = TwoBatchOptimizer._COPIED + ("base_optimizer",)

    @property
    def optimizer_name(self):
        """The base optimizer's registry name ("sgd", "adam", "adamw", "lion")."""
        return self.base_optimizer.name

    def _older_group_defaults(self):
        """A checkpoint older than one of torch.optim's flags (maximize, foreach, ...) lacks
        it: it takes torch.optim's default, as torch.optim's __setstate__ gives it, not this
        optimizer's argument; GERNE's own keys (beta) take this optimizer's defaults."""
        return dict(self.defaults, **self.base_optimizer.defaults)

    def _check_group(self, group, where, read_tensors=True):
        self.base_optimizer.check(group, where, read_tensors)
        check_beta_of(group, where, read_tensors)

    def _update(self, buckets, found_per_device):
        created = []
        for bucket, impl in zip(buckets, self._implementations(buckets)):
            self.base_optimizer.update(UpdateCall(impl, bucket, self.state,
                                                  found_per_device[bucket.device], created))
            bucket.write_back()
        # State created for a step that was then skipped must vanish again: a skipped step
        # changes nothing. Only steps that create state pay this host read.
        if created and self._may_skip() and found_any(found_per_device.values()):
            for p, keys in created:
                for key in keys:
                    self.state[p].pop(key, None)

    def state_dict(self):
        """torch.optim's state_dict (a pending stash as "grad_b" state, the skip count in the
        param groups)."""
        return self._with_checkpoint_extras(super().state_dict())

    def load_state_dict(self, state_dict):
        """Loads a GERNE checkpoint, an older one (with a "gerne" entry) or a torch.optim one of
        the same base optimizer."""
        state_dict = dict(state_dict)
        legacy = state_dict.pop("gerne", None)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            self.base_optimizer.load_state(p, state)
        self._restore_checkpoint_extras(legacy)
