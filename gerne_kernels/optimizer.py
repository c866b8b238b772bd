"""GERNE: an optimizer that steps along the extrapolated gradient of two batches.

    g = (1 + beta) * g_lb - beta * g_b

g_b is the gradient of the biased batch's loss, kept aside by ``stash_biased()``; g_lb is the
less-biased batch's gradient in ``.grad`` when ``step()`` runs. g then drives torch.optim's SGD,
Adam or AdamW update with torch.optim's exact semantics, in one fused pass over the parameters
where a fused backend is available. The thin class here gathers tensors and state; the math lives
in the ops of ``_ops.py`` (reference: ``_reference.py``).

Two ways to feed it the two gradients:

* stash mode: ``loss_b.backward(); opt.stash_biased(); loss_lb.backward(); opt.step()``. g_b is
  kept apart (one gradient-sized buffer), which allows per-batch AMP scales and inf/NaN checks,
  statistics (``track_statistics=True``) and one fused pass that forms g inside the update.
* memory-lean mode: ``opt.backward_biased(loss_b); opt.backward_less_biased(loss_lb);
  opt.step()``. By linearity the two backwards of -beta * L_b and (1 + beta) * L_lb accumulate
  g itself in ``.grad``: no second buffer; step() applies the plain update to ``.grad``.

torch.amp.GradScaler drives either mode through ``scaler.step(opt)`` (see ``_amp.py``).
"""

import math
import numbers
from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import _amp, _backends, _scalars
from .statistics import StatisticsAccumulator

_HYPERPARAMETERS = {
    "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                maximize=False),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False),
}


def _real(name, value, where, read_tensors=True):
    """value as a float; a TypeError naming the hyperparameter if it is not a real number.
    A one-element tensor gives None unless read_tensors (a host sync for a device tensor, a
    graph break under torch.compile)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value) if read_tensors else None
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"{name}{where} must be a real number (a float or a one-element tensor), "
                    f"got {value!r}")


def _check_beta(beta, bounds, where, read_tensors=True):
    if isinstance(beta, torch.Tensor) and beta.numel() != 1:
        raise ValueError(f"beta{where} must be a float or a one-element tensor, got a tensor of "
                         f"shape {tuple(beta.shape)}")
    beta = _real("beta", beta, where, read_tensors)
    if beta is None:  # a tensor: checked when given, not at every step
        return
    if math.isnan(beta):
        raise TypeError(f"beta{where} must be a real number, got {beta!r}")
    if math.isinf(beta):
        raise ValueError(f"beta{where} = {beta} is not finite: g = (1 + beta) g_lb - beta g_b "
                         "would be inf or NaN. Use a finite beta >= -1.")
    if beta < -1:
        raise ValueError(
            f"beta{where} = {beta} is below -1: the less-biased batch would get a negative "
            "weight (1 + beta). Use beta >= -1 (beta = -1 is plain class-balanced ERM).")
    if bounds is not None:
        try:
            lo, hi = (_real("beta_bounds", b, where) for b in bounds)
        except (TypeError, ValueError):
            lo = hi = math.nan
        if not lo <= hi:
            raise ValueError(f"beta_bounds{where} must be a pair (low, high) of real numbers "
                             f"with low <= high, e.g. gk.beta_bounds(...); got {bounds!r}")
        if not lo <= beta <= hi:
            source = getattr(bounds, "source", "the beta_bounds argument")
            raise ValueError(
                f"beta{where} = {beta} is outside [{lo:.4g}, {hi:.4g}] (from {source}); "
                "beyond these bounds some group's expected loss weight turns negative and "
                "training diverges. Choose beta inside them.")


def _check_hyperparameters(kind, group, where="", read_tensors=True):
    """torch.optim's range checks (NaN fails them all), naming the hyperparameter and the fix.
    lr and beta may be one-element tensors, read only with read_tensors: step() leaves them
    unread, to stay free of host syncs and graph breaks (they are checked when given)."""
    def nonnegative(name, label=None, read=True):
        value = _real(name, group[name], where, read)
        if value is not None and not 0.0 <= value:
            raise ValueError(f"Invalid {label or name}{where} = {group[name]}: use {name} >= 0")
        return value

    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr{where} must be a float or a one-element tensor, got a tensor of "
                         f"shape {tuple(lr.shape)}")
    nonnegative("lr", "learning rate lr", read_tensors)
    nonnegative("weight_decay")
    if kind == "sgd":
        momentum = nonnegative("momentum")
        dampening = _real("dampening", group["dampening"], where)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov=True{where} requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']}, "
                             f"dampening={group['dampening']})")
    else:
        nonnegative("eps")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= _real(f"betas[{i}]", b, where) < 1.0:
                raise ValueError(f"Invalid betas[{i}]{where} = {b}: use 0 <= b < 1 (these are "
                                 "Adam's moment decays, not GERNE's extrapolation beta)")
    _check_beta(group["beta"], group.get("beta_bounds"), where, read_tensors)


def nonfinite_flag(tensors):
    """A float32 0-d tensor: 1 if any element of any tensor is inf or NaN, else 0. One pass,
    no host sync: the max-abs norm of a tensor is finite exactly when all its elements are.

    On the CPU, where that norm is not vectorised (about 15x slower than a 2-norm), torch's
    AMP check runs instead: _amp_foreach_non_finite_check_and_unscale_ with scale 1, which
    flags the same elements and stores every value back unchanged.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    if device.type == "cpu":
        found, one = torch.zeros((), device=device), torch.ones((), device=device)
        by_dtype = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for same_dtype in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found, one)
        return found
    norms = torch.stack(torch._foreach_norm(tensors, float("inf")))
    return torch.logical_not(torch.isfinite(norms).all()).to(torch.float32)


class GERNE(Optimizer):
    """torch.optim.SGD / Adam / AdamW fed GERNE's extrapolated gradient.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        optimizer: "sgd", "adam" or "adamw"; its hyperparameters are those of torch.optim.
        beta: the extrapolation factor, >= -1 (per param group, schedulable like lr). lr and
            beta may be one-element tensors, changed in place by schedules: on the parameters'
            device they keep a step free of host syncs, let a captured CUDA graph follow them
            and never recompile a compiled step (there is no ``capturable`` flag: the cuda and
            triton backends are always capturable). Tensors are range-checked when given, not
            at each step.
        beta_bounds: optional (low, high), e.g. ``gk.beta_bounds(...)``; beta must stay inside.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        skip_nonfinite: skip a step (changing nothing) when g_b or g_lb holds inf or NaN.
        grad_scaler: the torch.amp.GradScaler whose ``scaler.step(opt)`` drives this optimizer,
            if any; needed in the stash mode so that the stash is unscaled and an inf/NaN in it
            makes the scaler back off.
        track_statistics: record ||g_b||, ||g_lb||, ||g|| and cos(g_b, g_lb) at each step
            (stash mode), on the device without a host sync; read ``opt.statistics``.

    Usage per step: ``zero_grad(); loss_b.backward(); stash_biased(); loss_lb.backward();
    step()``, or in the memory-lean mode ``zero_grad(); backward_biased(loss_b);
    backward_less_biased(loss_lb); step()``.
    """

    def __init__(self, params, optimizer="sgd", *, beta=1.0, beta_bounds=None, backend="auto",
                 skip_nonfinite=True, grad_scaler=None, track_statistics=False,
                 **hyperparameters):
        if optimizer not in _HYPERPARAMETERS:
            raise ValueError(f"optimizer must be one of {sorted(_HYPERPARAMETERS)}, "
                             f"got {optimizer!r}")
        if backend not in _backends.BACKENDS:
            raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
        known = _HYPERPARAMETERS[optimizer]
        unknown = sorted(set(hyperparameters) - set(known))
        if unknown:
            raise TypeError(f"GERNE(optimizer={optimizer!r}) got unexpected hyperparameters "
                            f"{unknown}; the accepted ones are {sorted(known)} "
                            "(as in torch.optim)")
        defaults = dict(known, **hyperparameters)
        defaults.update(beta=beta, beta_bounds=beta_bounds)
        _check_hyperparameters(optimizer, defaults)
        self.optimizer_kind = optimizer
        self._init_two_batch_state(backend, skip_nonfinite, grad_scaler, track_statistics)
        super().__init__(params, defaults)

    def _init_two_batch_state(self, backend, skip_nonfinite, grad_scaler, track_statistics):
        _amp.check_scaler(grad_scaler)
        self.backend = backend
        self.skip_nonfinite = skip_nonfinite
        self.grad_scaler = grad_scaler
        self.track_statistics = bool(track_statistics)
        self._skipped = {}  # device -> float32 count of skipped steps, kept on the device
        self._stash_signature = None
        self._lean = None  # memory-lean mode within a step: {"beta": beta, "calls": {"b", "lb"}}
        self._statistics = None
        # GradScaler sets opt.grad_scale and opt.found_inf for the duration of scaler.step(opt)
        # instead of unscaling .grad itself; they must stay unset otherwise.
        self._step_supports_amp_scaling = True

    def _check_group(self, group, where, read_tensors=True):
        _check_hyperparameters(self.optimizer_kind, group, where, read_tensors)

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

    # ----------------------------------------------------------------------------------------
    # The biased batch's gradient

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def has_stash(self):
        """True between stash_biased() and the step() that consumes it."""
        return self._stash_signature is not None

    @torch.no_grad()
    def stash_biased(self):
        """Moves each parameter's .grad (the biased batch's gradient g_b) aside and clears .grad.

        The move is free: the tensor is kept, not copied, and the next backward allocates a fresh
        .grad. A .grad that is a view (DDP's gradient_as_bucket_view) is copied instead, since
        its storage is overwritten by the next backward.
        """
        if self._lean is not None:
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
            if grad._is_view() or not grad.is_contiguous():
                stash = state.get("grad_b")
                if stash is None or stash.shape != grad.shape or stash.dtype != grad.dtype:
                    stash = torch.empty_like(grad, memory_format=torch.contiguous_format)
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
        self._stash_signature = tuple(id(p) for p in self._params())

    def zero_grad(self, set_to_none=True):
        """Clears .grad and discards a pending biased-batch gradient."""
        super().zero_grad(set_to_none=set_to_none)
        self._drop_stash()

    def _drop_stash(self):
        """Forgets the pending biased gradient: the stash, or the lean mode's record."""
        self._lean = None
        for p in self._params():
            state = self.state.get(p)
            if state is not None:
                state.pop("grad_b", None)
                if not state:  # no empty entries: a skipped first step leaves no trace
                    del self.state[p]
        self._stash_signature = None

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
        if self._lean is None:
            self._lean = {"beta": beta, "calls": set()}
        elif self._lean["beta"] != beta:
            raise RuntimeError(f"{name}(): beta changed from {self._lean['beta']} to {beta} "
                               "within a step; change beta between steps only.")
        self._lean["calls"].add(which)
        factor = -beta if which == "b" else 1.0 + beta
        (loss * factor).backward(**backward_kwargs)

    # ----------------------------------------------------------------------------------------
    # The step

    @property
    def statistics(self):
        """The last step's GradientStatistics (0-d device tensors: norm_b, norm_lb, norm, cos),
        or None. Recorded with track_statistics=True in the stash mode; reading a value reads
        the device, recording does not."""
        return self._statistics

    @property
    def skipped_steps(self):
        """How many steps were skipped for inf/NaN gradients (reads device counters)."""
        return int(sum(float(count) for count in self._skipped.values()))

    def _validate_before_step(self):
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f" (param group {i})", read_tensors=False)
        if self.has_stash() and self._stash_signature != tuple(id(p) for p in self._params()):
            raise RuntimeError("the parameter list changed between stash_biased() and step() "
                               "(add_param_group?): the stashed gradient no longer matches. "
                               "Call zero_grad() and redo both backwards.")
        if self._lean is not None:
            missing = [name for key, name in (("b", "backward_biased(loss_b)"),
                                              ("lb", "backward_less_biased(loss_lb)"))
                       if key not in self._lean["calls"]]
            if missing:
                raise RuntimeError(f"memory-lean mode: step() needs both backward_biased(loss_b) "
                                   f"and backward_less_biased(loss_lb); {missing[0]} was not "
                                   "called in this step")
            if any(float(g["beta"]) != self._lean["beta"] for g in self.param_groups):
                raise RuntimeError("beta changed after this step's lean-mode backwards, which "
                                   f"scaled the losses with beta = {self._lean['beta']}; change "
                                   "beta between steps only (zero_grad() and redo this step)")
        elif not self.has_stash() and any(g["beta"] != 0 for g in self.param_groups):
            raise RuntimeError("step() needs the biased batch's gradient g_b: call "
                               "opt.stash_biased() after loss_b.backward() and before "
                               "loss_lb.backward() (only beta = 0 runs without it)")

    def _gather(self, group):
        """Buckets of (params, g_b, g_lb) per (device, dtype), with zeros for a missing one."""
        buckets = defaultdict(lambda: ([], [], []))
        for p in group["params"]:
            state = self.state[p]
            g_b, g_lb = state.get("grad_b"), p.grad
            if g_b is None and g_lb is None:
                continue
            for name, g in (("g_b", g_b), ("g_lb", g_lb)):
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{name} of a parameter of shape {tuple(p.shape)} is "
                                       "sparse; GERNE does not support sparse gradients: use "
                                       "dense embeddings (sparse=False)")
                if g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                    raise RuntimeError(
                        f"{name} of a parameter of shape {tuple(p.shape)} ({p.dtype}, "
                        f"{p.device}) has shape {tuple(g.shape)} ({g.dtype}, {g.device}); "
                        "gradients must match their parameter's shape, dtype and device")
            if torch.is_complex(p):
                raise TypeError(f"a parameter of shape {tuple(p.shape)} is complex ({p.dtype}); "
                                "GERNE does not support complex parameters: store them as "
                                "real pairs with torch.view_as_real")
            if not p.is_contiguous():
                raise ValueError(f"GERNE's fused step needs contiguous parameters; a parameter "
                                 f"of shape {tuple(p.shape)} with strides {p.stride()} is not. "
                                 "Make it contiguous (p.data = p.data.contiguous()).")
            g_lb = torch.zeros_like(p) if g_lb is None else g_lb.contiguous()
            if g_b is not None:
                g_b = g_b.contiguous()
            else:  # without any stash (lean mode, beta = 0) scale_b is 0: no buffer needed
                g_b = torch.zeros_like(p) if self.has_stash() else g_lb
            bucket = buckets[(p.device, p.dtype)]
            bucket[0].append(p)
            bucket[1].append(g_b)
            bucket[2].append(g_lb)
        return buckets

    def _found_inf_for(self, device):
        found = torch.zeros((), dtype=torch.float32, device=device)
        scaler_found = getattr(self, "found_inf", None)  # set only inside scaler.step(opt)
        if scaler_found is not None:
            found.add_(scaler_found.to(device=device, dtype=torch.float32))
        return found

    @torch.no_grad()
    def step(self, closure=None):
        """One GERNE step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._validate_before_step()
        plans = self._plans()
        self._statistics = self._record_statistics(plans) if self.track_statistics else None
        found_per_device = self._apply(plans)
        self._finish_step(found_per_device)
        return loss

    def _plans(self):
        """Per param group and (device, dtype) bucket: (group, device, dtype, (params, g_b,
        g_lb), scale_b, scale_lb, inv_scale_b, inv_scale_lb); scale_lb * g_lb + scale_b * g_b
        is the unscaled extrapolated gradient (in the lean mode .grad already holds it). The
        scales are floats, or float64 tensors on the bucket's device (_scalars.py)."""
        stash = self.has_stash()
        inv_b, inv_lb = _amp.inverse_scales(self, stash)
        plans = []
        for group in self.param_groups:
            on_device = _scalars.any_tensor(*self._op_scalars(group), inv_b, inv_lb)
            for (device, dtype), tensors in self._gather(group).items():
                scale_b, scale_lb = _scalars.extrapolation_scales(
                    group["beta"], inv_b, inv_lb, stash, device if on_device else None)
                plans.append((group, device, dtype, tensors, scale_b, scale_lb, inv_b, inv_lb))
        return plans

    def _op_scalars(self, group):
        """The group's hyperparameters that reach the ops as lr / scales (tensors or floats)."""
        return group["lr"], group["beta"]

    def _record_statistics(self, plans):
        if not self.has_stash():
            return None
        accumulator = StatisticsAccumulator()
        for _, _, _, (_, grads_b, grads_lb), scale_b, scale_lb, inv_b, inv_lb in plans:
            accumulator.add(grads_b, grads_lb, inv_scale_b=inv_b, inv_scale_lb=inv_lb,
                            scale_b=scale_b, scale_lb=scale_lb)
        return accumulator.result()

    def _apply(self, plans):
        """Runs the fused update of every bucket; returns {device: found_inf}."""
        found_per_device = {}
        for device in {plan[1] for plan in plans}:
            found_per_device[device] = self._found_inf_for(device)
        # A skip must be total: every gradient on a device is checked before any update there.
        # With one bucket per device the fused op checks in its own first pass; with several,
        # one reduction pass over all of them runs first.
        # The implementations are chosen first: a backend that cannot run one bucket raises
        # before any bucket is updated.
        impls = [_backends.implementation(self.backend, plan[1].type, plan[2],
                                          tensor_scalars=_scalars.any_tensor(plan[4]))
                 for plan in plans]
        buckets_per_device = defaultdict(list)
        for plan, impl in zip(plans, impls):
            buckets_per_device[plan[1]].append((plan, impl))
        # Without a stash g_b aliases g_lb (scale_b = 0): one pass over g_lb checks everything.
        stash = self.has_stash()
        for device, device_plans in buckets_per_device.items():
            in_op_check = self.skip_nonfinite and stash and len(device_plans) == 1
            if self.skip_nonfinite and not in_op_check:
                grads = [g for plan, _ in device_plans
                         for g in (plan[3][1] + plan[3][2] if stash else plan[3][2])]
                found_per_device[device].add_(nonfinite_flag(grads))
            for (group, _, _, tensors, scale_b, scale_lb, _, _), impl in device_plans:
                self._update(impl, group, tensors, found_per_device[device], scale_b,
                             scale_lb, in_op_check)
        return found_per_device

    def _finish_step(self, found_per_device):
        """Counts skipped steps, tells a driving GradScaler, forgets the stash."""
        for device, found in found_per_device.items():
            counter = self._skipped.get(device)
            if counter is None:
                counter = self._skipped[device] = torch.zeros((), device=device)
            counter.add_(found)
        _amp.report_found_inf(self, found_per_device)
        self._drop_stash()

    def _update(self, impl, group, tensors, found_inf, scale_b, scale_lb, check_finite):
        params, grads_b, grads_lb = tensors
        lr = group["lr"]
        if _scalars.any_tensor(scale_b):  # the .tensor overloads: lr as a tensor too
            lr = _scalars.on_device(lr, params[0].device)
        else:
            lr = float(lr)
        common = dict(scale_b=scale_b, scale_lb=scale_lb, check_finite=check_finite)
        created = []
        if self.optimizer_kind == "sgd":
            momentum = group["momentum"]
            if momentum == 0:
                impl.sgd_step_(params, grads_b, grads_lb, [], found_inf, lr=lr, momentum=0.0,
                               dampening=group["dampening"], nesterov=group["nesterov"],
                               weight_decay=group["weight_decay"], maximize=group["maximize"],
                               is_first_step=False, **common)
                return
            old, new = [], []
            for i, p in enumerate(params):
                (new if self.state[p].get("momentum_buffer") is None else old).append(i)
            if check_finite and old and new:  # two calls: check both before either updates
                found_inf.add_(nonfinite_flag(grads_b + grads_lb))
                common["check_finite"] = False
            for indices, first in ((old, False), (new, True)):
                if not indices:
                    continue
                if first:
                    for i in indices:
                        self.state[params[i]]["momentum_buffer"] = torch.empty_like(params[i])
                        created.append((params[i], ("momentum_buffer",)))
                impl.sgd_step_([params[i] for i in indices], [grads_b[i] for i in indices],
                               [grads_lb[i] for i in indices],
                               [self.state[params[i]]["momentum_buffer"] for i in indices],
                               found_inf, lr=lr, momentum=momentum,
                               dampening=group["dampening"], nesterov=group["nesterov"],
                               weight_decay=group["weight_decay"], maximize=group["maximize"],
                               is_first_step=first, **common)
        else:
            amsgrad = group["amsgrad"]
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                    keys = ("step", "exp_avg", "exp_avg_sq")
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                        keys += ("max_exp_avg_sq",)
                    created.append((p, keys))
                elif amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
                    created.append((p, ("max_exp_avg_sq",)))
                if state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            impl.adam_step_(params, grads_b, grads_lb, [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states],
                            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                            [s["step"] for s in states], found_inf, lr=lr, beta1=float(beta1),
                            beta2=float(beta2), eps=group["eps"],
                            weight_decay=group["weight_decay"], amsgrad=amsgrad,
                            maximize=group["maximize"],
                            decoupled_weight_decay=self.optimizer_kind == "adamw", **common)
        # State created for a step that was then skipped must vanish again: a skipped step
        # changes nothing. Only steps that create state pay this host read.
        if created and float(found_inf) != 0:
            for p, keys in created:
                for key in keys:
                    self.state[p].pop(key, None)

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self):
        sd = super().state_dict()
        sd["gerne"] = {"skipped_steps": self.skipped_steps, "stashed": self.has_stash()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("gerne", {})  # absent in checkpoints of torch.optim optimizers
        super().load_state_dict(state_dict)
        self._restore_two_batch_state(extra, any(
            "grad_b" in self.state[p] for p in self._params() if p in self.state))

    def _restore_two_batch_state(self, extra, has_stashed_grads):
        """The skip count and the pending-stash marker of a checkpoint's "gerne" entry."""
        self._skipped = {}
        skipped = extra.get("skipped_steps", 0)
        if skipped:
            self._skipped[torch.device("cpu")] = torch.tensor(float(skipped))
        stashed = extra.get("stashed", False) or has_stashed_grads
        self._stash_signature = tuple(id(p) for p in self._params()) if stashed else None
