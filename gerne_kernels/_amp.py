"""How GERNE's optimizers meet torch.amp.GradScaler.

An optimizer with ``_step_supports_amp_scaling = True`` is driven this way by
``scaler.step(opt)``: the scaler checks ``.grad`` for inf/NaN (unless ``scaler.unscale_(opt)``
already did), sets ``opt.grad_scale`` (the loss scale S, a tensor; None when ``unscale_`` already
divided ``.grad`` by S) and ``opt.found_inf`` (its check), calls ``opt.step()`` and deletes both
attributes again. ``scaler.update()`` then backs off when any of the per-device found_inf tensors
it recorded for this optimizer is non-zero.

Two things the scaler cannot see: the stashed biased gradient g_b, which it neither checks nor
unscales. Both gradients were scaled by the same S (update() only runs after step()), so:

* g_lb = .grad is scaled by ``grad_scale``, or unscaled when ``grad_scale`` is None;
* g_b is scaled by S = ``scaler.get_scale()`` (the optimizer must know its scaler:
  ``grad_scaler=`` in its constructor);
* an inf/NaN found in g_b is added to the scaler's found_inf record for this optimizer, so that
  update() backs off exactly as for an overflow in .grad.

In the memory-lean mode both backwards accumulate into .grad, which the scaler sees whole: there
is no stash and nothing extra to do.
"""

import torch


def check_scaler(grad_scaler):
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError("grad_scaler must be a torch.amp.GradScaler (the one whose "
                        f"scaler.step(opt) drives this optimizer), got {type(grad_scaler)}")


def driven_by_scaler(opt):
    """True inside ``scaler.step(opt)`` (the scaler set ``opt.found_inf``)."""
    return getattr(opt, "found_inf", None) is not None


def found_inf_for(opt, device):
    """A fresh float32 0-d flag on device: the driving GradScaler's found_inf (its check of
    .grad), else 0."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    scaler_found = getattr(opt, "found_inf", None)  # set only inside scaler.step(opt)
    if scaler_found is not None:
        found.add_(scaler_found.to(device=device, dtype=torch.float32))
    return found


def inverse_scales(opt, has_stash):
    """(inv_scale_b, inv_scale_lb): the factors that unscale the stash and .grad; 1.0 without
    a loss scale, else 1 / S as a float64 0-d tensor on the scaler's device (never read on the
    host: the ops take it through their .tensor overloads)."""
    grad_scale = getattr(opt, "grad_scale", None)
    inv_scale_lb = 1.0 if grad_scale is None else grad_scale.double().reciprocal()
    if not has_stash or not driven_by_scaler(opt):
        return inv_scale_lb, inv_scale_lb
    scaler = opt.grad_scaler
    if scaler is None:
        raise RuntimeError(
            f"{type(opt).__name__}.step() is driven by a torch.amp.GradScaler, but the optimizer "
            "does not know that scaler: the stashed biased gradient needs its scale, and an "
            "inf/NaN in it must make the scaler back off. Construct the optimizer with "
            "grad_scaler=scaler (or set opt.grad_scaler = scaler).")
    if grad_scale is not None:  # .grad and the stash carry the same scale S
        return inv_scale_lb, inv_scale_lb
    # unscale_(opt) already divided .grad by S; the stash still carries it.
    return scaler._get_scale_async().double().reciprocal(), inv_scale_lb


def report_found_inf(opt, found_per_device):
    """Adds the optimizer's own inf/NaN findings (which cover the stash) to the scaler's record,
    so that ``scaler.update()`` backs off after a step skipped for the biased gradient."""
    scaler = getattr(opt, "grad_scaler", None)
    if scaler is None or not driven_by_scaler(opt):
        return
    try:
        record = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    except (AttributeError, KeyError, TypeError) as exc:
        raise RuntimeError(
            "this version of torch.amp.GradScaler keeps no per-optimizer found_inf record "
            f"({exc!r}); gerne_kernels supports torch 2.11 to 2.14") from exc
    for device, found in found_per_device.items():
        if device in record:
            record[device].add_(found.to(record[device].device))
        else:
            record[device] = found.clone()
