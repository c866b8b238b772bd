"""GERNE on sharded parameters: DTensors (FSDP2's ``fully_shard``), and what must be global.

The fused update is element-wise, so on a DTensor parameter it runs on the local shard
(``to_local()``: the same memory, no copy) with the local shards of its gradients and state.
What is not element-wise must be agreed on by every rank: a step skipped for an inf/NaN on one
rank is skipped on all, and the norms behind clipping and the statistics are those of the whole
gradient. Both come from one all-reduce (a sum) of ``[found_inf, sum g^2, sum g_b^2, sum g_lb^2,
sum g_b g_lb]`` over the mesh dimensions on which the parameters are sharded (on a replicated
dimension every rank holds the same values already).

ZeroRedundancyOptimizer gives each rank's optimizer only its shard of the parameters, so a GERNE
inside it could not move the other parameters' biased gradient aside and DDP would mix it into
g_lb: that is refused with an error (``refuse_zero_redundancy``).

torch.distributed.checkpoint's get/set_optimizer_state_dict prime an optimizer whose ``state``
is empty with a step at lr = 0 on zero gradients (``_init_optim_state``). GERNEWrapper's own
state only ever holds a pending stash, so DCP primes it even when its base optimizer has state,
and that step would still advance the base's step counts and decay its moments:
``called_by_dcp_priming`` lets the wrapper recognise it (and skip the base step then).
"""

import sys

import torch


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


# Plain tensors are the common case: their type answers without looking DTensor up.
PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def local(t):
    """The local shard of a DTensor (its memory, no copy), else t itself."""
    if type(t) in PLAIN_TYPES:
        return t
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def sharded_params(params):
    dtensor = _dtensor_class()
    if dtensor is None:
        return []
    return [p for p in params if isinstance(p, dtensor)]


def _shard_groups(dtensors):
    """The process groups of the mesh dimensions the parameters are sharded on."""
    from torch.distributed.tensor import Shard

    mesh = dtensors[0].device_mesh
    for p in dtensors[1:]:
        if p.device_mesh != mesh:
            raise RuntimeError("GERNE's global inf/NaN check and norms need all DTensor "
                               "parameters on one device mesh; got parameters on "
                               f"{mesh} and {p.device_mesh}. Use one optimizer per mesh.")
    dims = sorted({dim for p in dtensors for dim, placement in enumerate(p.placements)
                   if isinstance(placement, Shard)})
    for p in dtensors:
        for dim in dims:
            if not isinstance(p.placements[dim], Shard):
                raise RuntimeError(
                    "GERNE's norms over DTensor parameters need every parameter sharded on the "
                    f"same mesh dimensions; one has placements {p.placements} while others are "
                    f"sharded on dimensions {dims}")
    return [mesh.get_group(dim) for dim in dims]


def all_reduce_step_flags(params, found_per_device, sums_per_device):
    """Sums found_inf (and the scan sums, where given) over the ranks that share the sharded
    parameters, in place; a no-op without DTensor parameters."""
    dtensors = sharded_params(params)
    if not dtensors:
        return
    import torch.distributed as dist

    if sums_per_device:
        plain = [p for p in params if p.grad is not None
                 and not isinstance(p, _dtensor_class())]
        if plain:  # their sums are each rank's own: summing them over ranks would be wrong
            raise RuntimeError(
                "max_grad_norm and track_statistics need the norm of the whole gradient, but "
                f"{len(plain)} parameter(s) with gradients (the first of shape "
                f"{tuple(plain[0].shape)}) are plain tensors next to DTensor (FSDP2) ones: "
                "shard every parameter (fully_shard the root module too) or give the plain "
                "ones their own optimizer")
    groups = _shard_groups(dtensors)
    for device, found in found_per_device.items():
        sums = sums_per_device.get(device)
        packed = found.reshape(1).double()
        if sums is not None:
            packed = torch.cat([packed, sums])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        found.copy_(packed[0].clamp(max=1))
        if sums is not None:
            sums.copy_(packed[1:])


def gradient_marks(params):
    """What a backward changes in the DTensor parameters' .grad (identity and the local shard's
    version), to tell whether it delivered sharded gradients; None without DTensor
    parameters."""
    if not sharded_params(params):
        return None
    return [None if p.grad is None else (id(p.grad), local(p.grad)._version) for p in params]


def delivered_nothing(params, marks):
    """True when a backward since gradient_marks() left every sharded .grad as it was."""
    return marks is not None and gradient_marks(params) == marks


# FSDP2 without gradient sync keeps the gradient in its own unsharded buffer, where the next
# backwards (less-biased ones too) add to it before one reduce-scatter hands the mix over.
UNSYNCED_ACCUMULATION = (
    "accumulate_biased(): the backward delivered no sharded gradient. FSDP2 with "
    "set_requires_gradient_sync(False) (no_sync accumulation, as accelerate's) keeps gradients "
    "in one unsharded buffer where the biased and the less-biased ones mix. Keep gradient sync "
    "on for the backwards of a step that uses accumulate_biased(), or accumulate each batch "
    "with stash_biased() (no sync on all but the last backward of each batch), or use the "
    "one-backward mode (extrapolated_loss).")


def _callers(depth):
    """Up to ``depth`` frames, innermost first, from the caller of the function calling this."""
    frames, frame = [], sys._getframe(2)
    while frame is not None and len(frames) < depth:
        frames.append(frame)
        frame = frame.f_back
    return frames


def called_by_dcp_priming():
    """True when torch.distributed.checkpoint's priming step (``_init_optim_state``: lr = 0,
    zero gradients, on an optimizer with an empty ``state``) is the caller."""
    return any(frame.f_code.co_name == "_init_optim_state"
               and frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict"
               for frame in _callers(16))


def refuse_zero_redundancy(optimizer_name):
    """Raises when the caller is being constructed by ZeroRedundancyOptimizer."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None) if module is not None else None
    if zero is None:
        return
    for frame in _callers(12):
        if isinstance(frame.f_locals.get("self"), zero):
            raise TypeError(
                f"{optimizer_name} cannot run inside ZeroRedundancyOptimizer: ZeRO gives each "
                "rank's optimizer only its shard of the parameters, so the biased gradient of "
                "the other parameters would stay in .grad and DDP would mix it into the "
                "less-biased one. Shard with FSDP2 (torch.distributed.fsdp.fully_shard) "
                "instead, or use GERNE under plain DDP.")
