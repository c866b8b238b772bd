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
* one-backward mode: ``opt.extrapolated_loss(loss_b, loss_lb).backward(); opt.step()``. One
  backward of L_ext = (1 + beta) L_lb - beta L_b gives g exactly (the two batches may share one
  forward), so the stock training loops of Lightning, HF Trainer and accelerate run GERNE with
  their own clipping, accumulation and GradScaler.

Accumulation over micro-batch pairs in the stash mode: ``with opt.accumulate_biased():
loss_b.backward()`` makes autograd accumulate the biased gradient into the stash instead of
.grad, so pairs may interleave (biased, less-biased, biased, ...) and one step() sees the sums.

The inf/NaN guard follows torch.optim: a step driven by a GradScaler (``scaler.step(opt)``) that
meets inf or NaN in either batch's gradient changes nothing and makes the scaler back off; the
scaler checks .grad itself and the stash is scanned here. ``skip_nonfinite=True`` checks both
gradients at every step (one more read of them, see benchmarks/RESULTS.md), ``False`` never.
``max_grad_norm`` clips g with clip_grad_norm_'s semantics in the same read. Both are global:
across devices, and across ranks for sharded (DTensor) parameters.

This class owns what both share: the modes, the inf/NaN skip, AMP (``_amp.py``), statistics,
bucketing by device and dtype (``buckets.py``), the step's scalars (``_scalars.py``) and the
checkpoint extras. A subclass says how a bucket is updated (``_update``) and checks its groups
(``_check_group``): GERNE runs a base optimizer's fused op, GERNEWrapper writes g into .grad and
steps another optimizer.

Per-step records (the stash marker, the lean mode's calls, the skip counters, the last
statistics) live in one ``TwoBatchRecord`` object, so that a shallow copy of the optimizer's
``__dict__`` (Lightning's LightningOptimizer is one) sees and updates the same step.
"""

import contextlib
import dataclasses
import functools

import torch
from torch.optim import Optimizer

from . import _amp, _backends, _scalars, buckets as _buckets, hyperparameters as hp, sharding
from .statistics import statistics_from_sums
from .step_hooks import with_step_hooks

# clip_grad_norm_'s: coefficient = min(1, max_norm / (norm + eps))
CLIP_EPS = 1e-6


@dataclasses.dataclass
class TwoBatchRecord:
    """What the current step has been fed, and what earlier steps left to read.

    stash_signature: the parameters' identities when the stash was filled (None: no stash);
    lean_beta, lean_calls: the memory-lean mode's beta and which backwards ran this step;
    one_backward: the backward of an extrapolated_loss() ran in this step;
    skipped: {device: float32 0-d count of skipped steps}, kept on the device;
    statistics: the last step's GradientStatistics, or None;
    grad_norm: the last step's norm of g before clipping (with max_grad_norm), or None;
    zero_flags: {device: a float32 0 that no op writes}, the found_inf of unguarded steps.
    """
    stash_signature: tuple = None
    lean_beta: float = None
    lean_calls: set = None
    one_backward: bool = False
    skipped: dict = dataclasses.field(default_factory=dict)
    statistics: object = None
    grad_norm: object = None
    zero_flags: dict = dataclasses.field(default_factory=dict)


class TwoBatchOptimizer(Optimizer):
    """The shared core; see the module docstring. Subclasses call ``_init_two_batch`` before
    ``Optimizer.__init__`` and implement ``_check_group`` and ``_update``."""

    def _init_two_batch(self, backend, skip_nonfinite, grad_scaler, track_statistics,
                        max_grad_norm):
        if backend not in _backends.BACKENDS:
            raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
        if skip_nonfinite not in (None, True, False):
            raise TypeError("skip_nonfinite must be None (skip under a GradScaler, as "
                            f"torch.optim), True (always check) or False, got {skip_nonfinite!r}")
        if max_grad_norm is not None:
            value = hp.real("max_grad_norm", max_grad_norm, "")
            if not value > 0:
                raise ValueError(f"max_grad_norm = {max_grad_norm} must be > 0 (or None: no "
                                 "clipping)")
            max_grad_norm = value
        sharding.refuse_zero_redundancy(type(self).__name__)
        _amp.check_scaler(grad_scaler)
        self.backend = backend
        self.skip_nonfinite = skip_nonfinite
        self.grad_scaler = grad_scaler
        self.track_statistics = bool(track_statistics)
        self.max_grad_norm = max_grad_norm
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

    # What copy.deepcopy and pickle carry besides torch.optim's defaults, state and groups.
    _COPIED = ("backend", "skip_nonfinite", "grad_scaler", "track_statistics", "max_grad_norm",
               "_record", "_step_supports_amp_scaling")

    def __getstate__(self):
        state = super().__getstate__()
        state["two_batch"] = {key: self.__dict__[key] for key in self._COPIED
                              if key in self.__dict__}
        return state

    def __setstate__(self, state):
        # Checkpoints of torch.optim optimizers, or of older versions, lack keys: they take
        # _older_group_defaults().
        state = dict(state)
        extras = state.pop("two_batch", None)
        super().__setstate__(state)
        if extras is not None:
            self.__dict__.update(extras)
        for group in self.param_groups:
            for key, value in self._older_group_defaults().items():
                group.setdefault(key, value)
        if extras is not None and self._record.stash_signature is not None:
            self._record.stash_signature = self._signature()  # names the copy's parameters

    def _older_group_defaults(self):
        """What a loaded group lacks takes: this optimizer's defaults."""
        return self.defaults

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _signature(self):
        return tuple(map(id, self._params()))

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
        self._refuse_other_modes("stash_biased()", "stash")
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
            self.state[p]["grad_b"] = _owned(grad, self.state[p].get("grad_b"))
            if grad._is_view():
                grad.zero_()
            else:
                p.grad = None
            moved += 1
        if moved == 0:
            raise RuntimeError("stash_biased() found no gradients: run the biased batch's "
                               "backward (loss_b.backward()) before calling it")
        self._record.stash_signature = self._signature()

    @contextlib.contextmanager
    def accumulate_biased(self):
        """Within this context, backwards accumulate into the stash (the biased gradient g_b)
        instead of .grad, which keeps the less-biased gradient meanwhile::

            for (x_b, x_lb) in micro_batches:           # N pairs, interleaved
                with opt.accumulate_biased():
                    (loss(x_b) / N).backward()
                (loss(x_lb) / N).backward()
            opt.step()                                 # = the step on the full batches

        This is the order HF's and Lightning's accumulation produce, where stash_biased() cannot
        separate the two (the next biased backward would add to .grad holding g_lb). Under DDP
        each backward all-reduces as usual.
        """
        self._refuse_other_modes("accumulate_biased()", "stash")
        params = self._params()
        with torch.no_grad():
            # A .grad that is a view (DDP's gradient_as_bucket_view) is overwritten by the next
            # backward's all-reduce: keep a copy of the less-biased gradient instead.
            saved = [None if p.grad is None else p.grad.clone(memory_format=torch.preserve_format)
                     if p.grad._is_view() else p.grad for p in params]
            for p in params:
                p.grad = self.state[p].get("grad_b") if p in self.state else None
        marks, unsynced = sharding.gradient_marks(params), False
        try:
            yield
            unsynced = sharding.delivered_nothing(params, marks)
        finally:
            moved = False
            with torch.no_grad():
                for p, grad_lb in zip(params, saved):
                    if p.grad is not None:
                        stash = self.state[p].get("grad_b")
                        self.state[p]["grad_b"] = _owned(p.grad, stash)
                        moved = True
                    p.grad = grad_lb
            if moved:
                self._record.stash_signature = self._signature()
        if unsynced:  # FSDP2 kept the gradient unsharded, where it mixes with g_lb
            raise RuntimeError(sharding.UNSYNCED_ACCUMULATION)

    def _refuse_other_modes(self, name, mode):
        """One step uses one way of feeding the gradients."""
        record = self._record
        active = ("stash" if self.has_stash() else "lean" if record.lean_calls is not None
                  else "one-backward" if record.one_backward else None)
        if active is not None and active != mode:
            raise RuntimeError(
                f"{name} in a step that already uses the {active} mode: a step uses one mode "
                "(stash: stash_biased()/accumulate_biased(); memory-lean: backward_biased()/"
                "backward_less_biased(); one-backward: extrapolated_loss()). Call zero_grad() "
                "and redo the step in one mode.")

    def zero_grad(self, set_to_none=True):
        """Clears .grad and discards a pending biased-batch gradient."""
        super().zero_grad(set_to_none=set_to_none)
        self._drop_stash()

    def _drop_stash(self):
        """Forgets what the step was fed: the stash, the lean mode's record, the one-backward
        marker."""
        self._record.lean_beta = self._record.lean_calls = None
        self._record.one_backward = False
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
        self._refuse_other_modes(f"{name}()", "lean")
        if self.track_statistics:
            raise RuntimeError(f"{name}(): track_statistics=True needs g_b and g_lb apart, "
                               "which the memory-lean mode never has. Use the stash mode "
                               "(loss_b.backward(); opt.stash_biased(); loss_lb.backward()) or "
                               "track_statistics=False.")
        beta = float(self._one_beta(f"{name}(): the memory-lean mode"))
        record = self._record
        if record.lean_calls is None:
            record.lean_beta, record.lean_calls = beta, set()
        elif record.lean_beta != beta:
            raise RuntimeError(f"{name}(): beta changed from {record.lean_beta} to {beta} "
                               "within a step; change beta between steps only.")
        record.lean_calls.add(which)
        factor = -beta if which == "b" else 1.0 + beta
        (loss * factor).backward(**backward_kwargs)

    def _one_beta(self, what):
        """The beta of every param group (a float, or one shared tensor); a ValueError when
        the groups have different betas."""
        betas = [group["beta"] for group in self.param_groups]
        if all(b is betas[0] for b in betas):
            return betas[0]
        values = sorted({float(b) for b in betas})
        if len(values) != 1:
            raise ValueError(f"{what} scales each loss by one beta, but the param groups have "
                             f"betas {values}. Use the stash mode (stash_biased()) for "
                             "per-group betas.")
        return betas[0]

    # ----------------------------------------------------------------------------------------
    # The one-backward mode

    def extrapolated_loss(self, loss_b, loss_lb):
        """L_ext = (1 + beta) * loss_lb - beta * loss_b with this optimizer's beta.

        One backward of it gives the extrapolated gradient g exactly (by linearity), and the
        step then applies the plain update to .grad: the one-backward mode, for training loops
        that do one backward per step (Lightning's automatic optimization: return this from
        training_step; HF Trainer: return it from compute_loss; accelerate:
        ``accelerator.backward(loss)``). Their clipping, gradient accumulation and GradScaler
        then act on g itself. Needs one beta for all param groups (a float, or one tensor).
        """
        self._refuse_other_modes("extrapolated_loss()", "one-backward")
        beta = self._one_beta("extrapolated_loss(): the one-backward mode")
        loss = extrapolated_loss(loss_b, loss_lb, beta)
        # Marked when its backward runs, not here: Lightning calls training_step (which builds
        # the loss) before its zero_grad(), which forgets what the step was fed.
        if loss.requires_grad:
            loss.register_hook(functools.partial(_mark_one_backward, self._record))
        return loss

    # ----------------------------------------------------------------------------------------
    # The step

    @property
    def statistics(self):
        """The last step's GradientStatistics (0-d device tensors: norm_b, norm_lb, norm, cos),
        or None. Recorded with track_statistics=True in the stash mode; reading a value reads
        the device, recording does not."""
        return self._record.statistics

    @property
    def grad_norm(self):
        """The norm of the last step's extrapolated gradient g before clipping, as
        clip_grad_norm_ returns it (a 0-d tensor on the first device; unscaled under AMP), or
        None without max_grad_norm."""
        return self._record.grad_norm

    @property
    def skipped_steps(self):
        """How many steps were skipped for inf/NaN gradients (reads device counters)."""
        return int(sum(float(count) for count in self._record.skipped.values()
                       if count.device.type != "meta"))

    def _validate_before_step(self):
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f" (param group {i})", read_tensors=False)
        record = self._record
        if self.has_stash() and record.stash_signature != self._signature():
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
        elif (not self.has_stash() and not record.one_backward
              and any(g["beta"] != 0 for g in self.param_groups) and not self._priming()
              and any(p.grad is not None for p in self._params())):  # no gradient: a no-op
            raise RuntimeError("step() needs the biased batch's gradient g_b: call "
                               "opt.stash_biased() after loss_b.backward() and before "
                               "loss_lb.backward(), or build the loss with "
                               "opt.extrapolated_loss(loss_b, loss_lb) and backward it once "
                               "(only beta = 0 runs without either)")

    def _priming(self):
        """A step with lr = 0 in every group and nothing fed: how torch.distributed.checkpoint
        creates the state of a fresh optimizer (zero gradients, lr = 0). It runs as a plain
        update of .grad, as it does for torch.optim, and moves no parameter."""
        return all("lr" in g and float(g["lr"]) == 0 for g in self.param_groups)

    @with_step_hooks
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

    def _guarding(self):
        """Whether this step checks for inf/NaN: skip_nonfinite, or by default (None) when a
        GradScaler drives it, as torch.optim's fused optimizers do."""
        if self.skip_nonfinite is None:
            return _amp.driven_by_scaler(self)
        return self.skip_nonfinite

    def _may_skip(self):
        return self._guarding() or _amp.driven_by_scaler(self)

    def _found_inf(self, device, written):
        """The step's flag on device: the driving GradScaler's found_inf (its check of .grad),
        else a fresh 0 where a scan will write it, else a 0 that nothing writes (an unguarded
        step then launches nothing for it)."""
        if _amp.driven_by_scaler(self):
            return self.found_inf.to(device=device, dtype=torch.float32)
        if written:
            return torch.zeros((), dtype=torch.float32, device=device)
        flag = self._record.zero_flags.get(device)
        if flag is None:
            flag = self._record.zero_flags[device] = torch.zeros((), dtype=torch.float32,
                                                                 device=device)
        return flag

    def _scan(self, buckets):
        """{device: found_inf} for the step, after the scan_ pass where one is needed.

        The pass reads every gradient once, before any update (so that a skip is total): for
        the inf/NaN guard, and for the sums behind clipping and the statistics. Under a
        GradScaler the scaler has checked .grad already, so the guard scans the stash alone.
        Then a skip, and the norms, are made global over devices and sharded ranks, and
        clipping folds its coefficient into the buckets' scales."""
        stash = self.has_stash()
        guard, scaler_checked = self._guarding(), _amp.driven_by_scaler(self)
        want_stats = self.track_statistics and stash
        want_sums = want_stats or self.max_grad_norm is not None
        found_per_device, sums_per_device = {}, {}
        for bucket, impl in zip(buckets, self._implementations(buckets)):
            device = bucket.device
            if device not in found_per_device:
                found_per_device[device] = self._found_inf(device, guard)
                if want_sums:
                    sums_per_device[device] = torch.zeros(4, dtype=torch.float64, device=device)
            scan = impl.op("scan_")
            if want_sums:
                # Without a guard the sums' own flag is a scratch one: it must not skip the step.
                flag = (found_per_device[device] if guard
                        else torch.zeros((), dtype=torch.float32, device=device))
                if stash:
                    scan(bucket.grads_b, bucket.grads_lb, flag, sums_per_device[device],
                         scale_b=bucket.scale_b, scale_lb=bucket.scale_lb)
                else:  # .grad holds g (scaled by scale_lb): scanned as the "biased" list
                    scan(bucket.grads_lb, [], flag, sums_per_device[device],
                         scale_b=bucket.scale_lb, scale_lb=_scalars.zero_like(bucket.scale_lb))
            elif guard and stash:
                scan(bucket.grads_b, [] if scaler_checked else bucket.grads_lb,
                     found_per_device[device], None, scale_b=bucket.scale_b,
                     scale_lb=bucket.scale_lb)
            elif guard and not scaler_checked:
                scan(bucket.grads_lb, [], found_per_device[device], None,
                     scale_b=bucket.scale_lb, scale_lb=_scalars.zero_like(bucket.scale_lb))
        if self._may_skip() and len(found_per_device) > 1:  # a skip is global across devices
            devices = list(found_per_device)
            total = sum(found_per_device[d].to(devices[0]) for d in devices).clamp(max=1)
            found_per_device = {d: total.to(d) for d in devices}
        if self._may_skip() or sums_per_device:  # else the flags are zeros nothing writes
            sharding.all_reduce_step_flags(self._params(), found_per_device, sums_per_device)
        self._record.statistics = self._record.grad_norm = None
        if want_sums and sums_per_device:
            self._clip(buckets, sums_per_device)
            if want_stats:
                inv_b, inv_lb = _amp.inverse_scales(self, stash)
                dtype = (torch.float64 if any(b.dtype == torch.float64 for b in buckets)
                         else torch.float32)
                self._record.statistics = statistics_from_sums(list(sums_per_device.values()),
                                                               inv_b, inv_lb, dtype)
        return found_per_device

    def _clip(self, buckets, sums_per_device):
        """clip_grad_norm_ on g: with norm = ||g|| over all parameters, every bucket's scales
        are multiplied by min(1, max_grad_norm / (norm + 1e-6)), on the device."""
        if self.max_grad_norm is None:
            return
        devices = list(sums_per_device)
        squared = sum(sums_per_device[d][0].to(devices[0]) for d in devices)
        norm = squared.sqrt()
        dtype = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
        self._record.grad_norm = norm.to(dtype)
        coefficient = (self.max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        on = {d: coefficient.to(d) for d in devices}
        for bucket in buckets:
            c = on[bucket.device]
            bucket.scale_b = _scalars.on_device(bucket.scale_b, bucket.device) * c
            bucket.scale_lb = _scalars.on_device(bucket.scale_lb, bucket.device) * c

    def _finish_step(self, found_per_device):
        """Counts skipped steps, tells a driving GradScaler, forgets what the step was fed."""
        if self._may_skip():
            for device, found in found_per_device.items():
                counter = self._record.skipped.get(device)
                if counter is None:
                    counter = self._record.skipped[device] = torch.zeros((), device=device)
                counter.add_(found.clamp(max=1))
            _amp.report_found_inf(self, found_per_device)
        self._drop_stash()

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    # The skip count travels in every param group of a state_dict (torch.distributed.checkpoint
    # keeps the groups' keys, and only "state" and "param_groups"); a pending stash is the
    # "grad_b" entry of the parameters' state.
    SKIPPED_KEY = "gerne_skipped_steps"

    def _with_checkpoint_extras(self, state_dict):
        """A state_dict whose param groups carry the skip count."""
        skipped = self.skipped_steps
        state_dict["param_groups"] = [dict(group, **{self.SKIPPED_KEY: skipped})
                                      for group in state_dict["param_groups"]]
        return state_dict

    def _restore_checkpoint_extras(self, legacy=None):
        """After a load: the skip count (from the groups, or an older checkpoint's "gerne"
        entry) and the pending-stash marker (from the state's "grad_b" entries)."""
        counts = [group.pop(self.SKIPPED_KEY) for group in self.param_groups
                  if self.SKIPPED_KEY in group]
        skipped = max(counts) if counts else (legacy or {}).get("skipped_steps", 0)
        self._record.skipped = {}
        if skipped:
            self._record.skipped[torch.device("cpu")] = torch.tensor(float(skipped))
        stashed = any("grad_b" in self.state[p] for p in self._params() if p in self.state)
        self._record.stash_signature = self._signature() if stashed else None


def check_beta_of(group, where, read_tensors=True):
    """GERNE's own keys of a param group: beta, within its beta_bounds."""
    hp.check_beta(group["beta"], group.get("beta_bounds"), where, read_tensors)


def found_any(flags):
    """True when a step's found_inf flag is set on any device (reads them; a meta tensor holds
    no value and counts as unset, so that meta parameters step as torch.optim's do)."""
    return any(float(flag) != 0 for flag in flags if flag.device.type != "meta")


def extrapolated_loss(loss_b, loss_lb, beta):
    """L_ext = (1 + beta) * loss_lb - beta * loss_b (Eq. 5): one backward gives g exactly."""
    return (1 + beta) * loss_lb - beta * loss_b


def _mark_one_backward(record, grad):
    """Backward hook of extrapolated_loss()'s loss: this step's .grad holds g."""
    record.one_backward = True


def _owned(grad, stash):
    """grad as a tensor the stash may keep: grad itself, or, for a view (DDP's
    gradient_as_bucket_view, whose memory the next backward overwrites), a copy, into ``stash``
    where it fits."""
    if not grad._is_view():
        return grad
    if (stash is None or stash is grad or stash.shape != grad.shape or stash.dtype != grad.dtype
            or stash.stride() != grad.stride()):
        stash = torch.empty_like(grad, memory_format=torch.preserve_format)
    return stash.copy_(grad)
