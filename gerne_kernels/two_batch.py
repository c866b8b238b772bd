"""The two-batch core of GERNE and GERNEWrapper: an Optimizer that is fed two gradients.

    g = (1 + beta) * g_lb - beta * g_b

g_b is the gradient of the biased batch's loss, g_lb the less-biased batch's. Two ways to feed
them:

* stash mode: ``loss_b.backward(); opt.stash_biased(); loss_lb.backward(); opt.step()``. g_b is
  kept apart (in the state, as ``grad_b``: one gradient-sized buffer, moved, not copied), which
  allows per-batch AMP scales and inf/NaN checks, statistics (``track_statistics=True``) and one
  fused pass that forms g inside the update.
* memory-lean mode: ``opt.backward_biased(loss_b); opt.backward_less_biased(loss_lb);
  opt.step()``. By linearity the two backwards of -beta * L_b and (1 + beta) * L_lb accumulate
  g itself in ``.grad``: no second buffer; step() applies the plain update to ``.grad``.

This class owns what both share: the modes, the inf/NaN skip, AMP (``_amp.py``), statistics,
bucketing by device and dtype (``buckets.py``), the step's scalars (``_scalars.py``) and the
checkpoint extras. A subclass says how a bucket is updated (``_update``) and checks its groups
(``_check_group``): GERNE runs a base optimizer's fused op, GERNEWrapper writes g into .grad and
steps another optimizer.

Per-step records (the stash marker, the lean mode's calls, the skip counters, the last
statistics) live in one ``TwoBatchRecord`` object, so that a shallow copy of the optimizer's
``__dict__`` (Lightning's LightningOptimizer is one) sees and updates the same step.
"""

import dataclasses

import torch
from torch.optim import Optimizer

from . import _amp, _backends, _scalars, buckets as _buckets, hyperparameters as hp
from .statistics import statistics_from_sums


@dataclasses.dataclass
class TwoBatchRecord:
    """What the current step has been fed, and what earlier steps left to read.

    stash_signature: the parameters' identities when stash_biased() ran (None: no stash);
    lean_beta, lean_calls: the memory-lean mode's beta and which backwards ran this step;
    skipped: {device: float32 0-d count of skipped steps}, kept on the device;
    statistics: the last step's GradientStatistics, or None.
    """
    stash_signature: tuple = None
    lean_beta: float = None
    lean_calls: set = None
    skipped: dict = dataclasses.field(default_factory=dict)
    statistics: object = None


class TwoBatchOptimizer(Optimizer):
    """The shared core; see the module docstring. Subclasses call ``_init_two_batch`` before
    ``Optimizer.__init__`` and implement ``_check_group`` and ``_update``."""

    def _init_two_batch(self, backend, skip_nonfinite, grad_scaler, track_statistics):
        if backend not in _backends.BACKENDS:
            raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
        _amp.check_scaler(grad_scaler)
        self.backend = backend
        self.skip_nonfinite = skip_nonfinite
        self.grad_scaler = grad_scaler
        self.track_statistics = bool(track_statistics)
        self._record = TwoBatchRecord()
        # GradScaler sets opt.grad_scale and opt.found_inf for the duration of scaler.step(opt)
        # instead of unscaling .grad itself; they must stay unset otherwise.
        self._step_supports_amp_scaling = True

    def _check_group(self, group, where, read_tensors=True):
        raise NotImplementedError

    def _update(self, buckets, found_per_device):
        """Applies the step to every bucket (found_per_device: {device: found_inf})."""
        raise NotImplementedError

    def add_param_group(self, param_group):
        # Checked before torch appends it: a refused group must leave no trace.
        if isinstance(param_group, dict):
            self._check_group({**self.defaults, **param_group},
                              f" (param group {len(self.param_groups)})")
        super().add_param_group(param_group)

    def __setstate__(self, state):
        # Checkpoints of torch.optim optimizers, or of older versions, lack GERNE's keys:
        # they take this optimizer's defaults.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    # ----------------------------------------------------------------------------------------
    # The biased batch's gradient

    def has_stash(self):
        """True between stash_biased() and the step() that consumes it."""
        return self._record.stash_signature is not None

    @torch.no_grad()
    def stash_biased(self):
        """Moves each parameter's .grad (the biased batch's gradient g_b) aside and clears .grad.

        The move is free: the tensor is kept, not copied, and the next backward allocates a fresh
        .grad. A .grad that is a view (DDP's gradient_as_bucket_view) is copied instead, since
        its storage is overwritten by the next backward.
        """
        if self._record.lean_calls is not None:
            raise RuntimeError("stash_biased() after backward_biased()/backward_less_biased(): "
                               "a step uses either the stash mode or the memory-lean mode. Call "
                               "zero_grad() and redo the step in one mode.")
        if self.has_stash():
            raise RuntimeError("stash_biased() was called twice without step(): the first "
                               "biased gradient is still waiting. Call step() (or zero_grad() "
                               "to discard it) before stashing again.")
        moved = 0
        for p in self._params():
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("GERNE does not support sparse gradients (parameter of shape "
                                   f"{tuple(p.shape)}); use dense embeddings "
                                   "(sparse=False) or a sparse-aware optimizer")
            state = self.state[p]
            if grad._is_view():
                stash = state.get("grad_b")
                if (stash is None or stash.shape != grad.shape or stash.dtype != grad.dtype
                        or stash.stride() != grad.stride()):
                    stash = torch.empty_like(grad, memory_format=torch.preserve_format)
                stash.copy_(grad)
                state["grad_b"] = stash
                grad.zero_()
            else:
                state["grad_b"] = grad
                p.grad = None
            moved += 1
        if moved == 0:
            raise RuntimeError("stash_biased() found no gradients: run the biased batch's "
                               "backward (loss_b.backward()) before calling it")
        self._record.stash_signature = tuple(id(p) for p in self._params())

    def zero_grad(self, set_to_none=True):
        """Clears .grad and discards a pending biased-batch gradient."""
        super().zero_grad(set_to_none=set_to_none)
        self._drop_stash()

    def _drop_stash(self):
        """Forgets the pending biased gradient: the stash, or the lean mode's record."""
        self._record.lean_beta = self._record.lean_calls = None
        for p in self._params():
            state = self.state.get(p)
            if state is not None:
                state.pop("grad_b", None)
                if not state:  # no empty entries: a skipped first step leaves no trace
                    del self.state[p]
        self._record.stash_signature = None

    # ----------------------------------------------------------------------------------------
    # The memory-lean mode

    def backward_biased(self, loss_b, **backward_kwargs):
        """Memory-lean mode: backward of -beta * loss_b, accumulating into .grad.

        Together with ``backward_less_biased(loss_lb)`` (in either order, each possibly several
        times for gradient accumulation) .grad ends up holding the extrapolated gradient
        g = (1 + beta) g_lb - beta g_b itself, with no second gradient buffer; step() then
        applies the plain update to .grad. Under AMP pass ``scaler.scale(loss_b)``. Needs one
        beta for all param groups; gives up what needs g_b and g_lb apart (statistics,
        telling which batch overflowed).
        """
        self._lean_backward("b", loss_b, backward_kwargs)

    def backward_less_biased(self, loss_lb, **backward_kwargs):
        """Memory-lean mode: backward of (1 + beta) * loss_lb, accumulating into .grad."""
        self._lean_backward("lb", loss_lb, backward_kwargs)

    def _lean_backward(self, which, loss, backward_kwargs):
        name = "backward_biased" if which == "b" else "backward_less_biased"
        if self.has_stash():
            raise RuntimeError(f"{name}() after stash_biased(): a step uses either the stash "
                               "mode or the memory-lean mode. Call zero_grad() and redo the "
                               "step in one mode.")
        if self.track_statistics:
            raise RuntimeError(f"{name}(): track_statistics=True needs g_b and g_lb apart, "
                               "which the memory-lean mode never has. Use the stash mode "
                               "(loss_b.backward(); opt.stash_biased(); loss_lb.backward()) or "
                               "track_statistics=False.")
        betas = sorted({float(group["beta"]) for group in self.param_groups})
        if len(betas) != 1:
            raise ValueError(f"{name}(): the memory-lean mode scales each loss by one beta, but "
                             f"the param groups have betas {betas}. Use the stash mode "
                             "(stash_biased()) for per-group betas.")
        beta = betas[0]
        record = self._record
        if record.lean_calls is None:
            record.lean_beta, record.lean_calls = beta, set()
        elif record.lean_beta != beta:
            raise RuntimeError(f"{name}(): beta changed from {record.lean_beta} to {beta} "
                               "within a step; change beta between steps only.")
        record.lean_calls.add(which)
        factor = -beta if which == "b" else 1.0 + beta
        (loss * factor).backward(**backward_kwargs)

    # ----------------------------------------------------------------------------------------
    # The step

    @property
    def statistics(self):
        """The last step's GradientStatistics (0-d device tensors: norm_b, norm_lb, norm, cos),
        or None. Recorded with track_statistics=True in the stash mode; reading a value reads
        the device, recording does not."""
        return self._record.statistics

    @property
    def skipped_steps(self):
        """How many steps were skipped for inf/NaN gradients (reads device counters)."""
        return int(sum(float(count) for count in self._record.skipped.values()))

    def _validate_before_step(self):
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f" (param group {i})", read_tensors=False)
        record = self._record
        if self.has_stash() and record.stash_signature != tuple(id(p) for p in self._params()):
            raise RuntimeError("the parameter list changed between stash_biased() and step() "
                               "(add_param_group?): the stashed gradient no longer matches. "
                               "Call zero_grad() and redo both backwards.")
        if record.lean_calls is not None:
            missing = [name for key, name in (("b", "backward_biased(loss_b)"),
                                              ("lb", "backward_less_biased(loss_lb)"))
                       if key not in record.lean_calls]
            if missing:
                raise RuntimeError(f"memory-lean mode: step() needs both backward_biased(loss_b) "
                                   f"and backward_less_biased(loss_lb); {missing[0]} was not "
                                   "called in this step")
            if any(float(g["beta"]) != record.lean_beta for g in self.param_groups):
                raise RuntimeError("beta changed after this step's lean-mode backwards, which "
                                   f"scaled the losses with beta = {record.lean_beta}; change "
                                   "beta between steps only (zero_grad() and redo this step)")
        elif not self.has_stash() and any(g["beta"] != 0 for g in self.param_groups):
            raise RuntimeError("step() needs the biased batch's gradient g_b: call "
                               "opt.stash_biased() after loss_b.backward() and before "
                               "loss_lb.backward() (only beta = 0 runs without it)")

    @torch.no_grad()
    def step(self, closure=None):
        """One GERNE step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._validate_before_step()
        self._prepare_gradients()
        buckets = self._buckets()
        found_per_device = self._scan(buckets)
        self._update(buckets, found_per_device)
        self._finish_step(found_per_device)
        return loss

    def _prepare_gradients(self):
        """Hook before the step gathers its tensors (the wrapper gives .grad its layout)."""

    def _op_scalars(self, group):
        """The group's hyperparameters that reach the ops as lr / scales (tensors or floats)."""
        return group["lr"], group["beta"]

    def _buckets(self):
        """The step's Buckets, with their scales: scale_lb * g_lb + scale_b * g_b is the
        unscaled extrapolated gradient (in the lean mode .grad already holds it). The scales
        are floats, or float64 tensors on the bucket's device (_scalars.py)."""
        stash = self.has_stash()
        inv_b, inv_lb = _amp.inverse_scales(self, stash)
        buckets = []
        for group in self.param_groups:
            on_device = _scalars.any_tensor(*self._op_scalars(group), inv_b, inv_lb)
            for bucket in _buckets.gather(group, self.state, stash):
                bucket.scale_b, bucket.scale_lb = _scalars.extrapolation_scales(
                    group["beta"], inv_b, inv_lb, stash, bucket.device if on_device else None)
                buckets.append(bucket)
        return buckets

    def _implementations(self, buckets):
        """Each bucket's backend ops, chosen before any update: a backend that cannot run one
        bucket raises before anything changes."""
        return [_backends.implementation(self.backend, bucket.device.type, bucket.dtype,
                                         tensor_scalars=_scalars.any_tensor(bucket.scale_b))
                for bucket in buckets]

    def _scan(self, buckets):
        """{device: found_inf} for the step, after the scan_ pass where one is needed: the
        inf/NaN check (skip_nonfinite) and the sums behind the statistics read every gradient
        once, before any update, so that a skip is total."""
        stash = self.has_stash()
        found_per_device = {}
        sums_per_device = {}
        want_sums = self.track_statistics and stash
        for bucket, impl in zip(buckets, self._implementations(buckets)):
            device = bucket.device
            if device not in found_per_device:
                found_per_device[device] = _amp.found_inf_for(self, device)
                if want_sums:
                    sums_per_device[device] = torch.zeros(4, dtype=torch.float64, device=device)
            if not (self.skip_nonfinite or want_sums):
                continue
            # A flag for the statistics alone must not skip the step: a scratch one then.
            found = (found_per_device[device] if self.skip_nonfinite
                     else torch.zeros((), dtype=torch.float32, device=device))
            if stash:
                impl.op("scan_")(bucket.grads_b, bucket.grads_lb, found,
                                 sums_per_device.get(device), scale_b=bucket.scale_b,
                                 scale_lb=bucket.scale_lb)
            else:  # g_b aliases g_lb (scale_b = 0): g_lb alone
                impl.op("scan_")(bucket.grads_lb, [], found, None, scale_b=bucket.scale_lb,
                                 scale_lb=bucket.scale_lb)
        if len(found_per_device) > 1:  # a skip is global across devices
            devices = list(found_per_device)
            total = sum(found_per_device[d].to(devices[0]) for d in devices)
            found_per_device = {d: total.to(d) for d in devices}
        self._record.statistics = None
        if want_sums and sums_per_device:
            inv_b, inv_lb = _amp.inverse_scales(self, stash)
            dtype = (torch.float64 if any(b.dtype == torch.float64 for b in buckets)
                     else torch.float32)
            self._record.statistics = statistics_from_sums(list(sums_per_device.values()),
                                                           inv_b, inv_lb, dtype)
        return found_per_device

    def _finish_step(self, found_per_device):
        """Counts skipped steps, tells a driving GradScaler, forgets the stash."""
        for device, found in found_per_device.items():
            counter = self._record.skipped.get(device)
            if counter is None:
                counter = self._record.skipped[device] = torch.zeros((), device=device)
            counter.add_(found)
        _amp.report_found_inf(self, found_per_device)
        self._drop_stash()

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def _checkpoint_extras(self):
        return {"skipped_steps": self.skipped_steps, "stashed": self.has_stash()}

    def _restore_two_batch_state(self, extra, has_stashed_grads):
        """The skip count and the pending-stash marker of a checkpoint's "gerne" entry."""
        self._record.skipped = {}
        skipped = extra.get("skipped_steps", 0)
        if skipped:
            self._record.skipped[torch.device("cpu")] = torch.tensor(float(skipped))
        stashed = extra.get("stashed", False) or has_stashed_grads
        self._record.stash_signature = (tuple(id(p) for p in self._params()) if stashed
                                        else None)


def check_beta_of(group, where, read_tensors=True):
    """GERNE's own keys of a param group: beta, within its beta_bounds."""
    hp.check_beta(group["beta"], group.get("beta_bounds"), where, read_tensors)
