"""The tensors of one step, grouped as the fused ops take them: per param group, device and dtype.

A ``Bucket`` holds a param group's parameters of one device and dtype, their two gradients and
the operands that an op reads and writes in their place. The ops walk memory linearly, so an
operand must be contiguous. Every layout torch.optim accepts is taken:

* a contiguous tensor is its own operand (the usual case, and the fast path: no Python work);
* a dense, non-overlapping tensor in another memory order (channels_last, any permutation of
  the dimensions) is viewed as the flat run of memory it covers: element i of that view is the
  same element of the parameter, of its gradients and of its state whenever they share the
  parameter's strides, which they do when autograd and the optimizer create them. The op then
  updates the tensor in place, and the stash and new state keep the parameter's layout;
* anything else (a view with gaps, such as ``torch.randn(10, 5, 2)[..., 0]``, or a gradient in
  another layout than its parameter) is copied into a temporary laid out like the parameter's
  operand, and what the op writes is copied back after it: correct, at the cost of the copies.

A complex parameter is its real and imaginary parts (``torch.view_as_real``), as torch.optim
treats it: its gradients and state likewise, each part updated as a real number. A DTensor is
its local shard.
"""

import dataclasses
from collections import defaultdict

import torch

from .sharding import PLAIN_TYPES, local


def elements(t):
    """What the ops see of a tensor: its local shard, complex numbers as real pairs."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t):
    """True when t's elements fill one contiguous run of memory without overlap, in some
    order of its dimensions (contiguous, channels_last, any permutation)."""
    if t.is_contiguous():
        return True
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def same_strides(a, b):
    """a and b have the same shape and the same strides on every dimension longer than 1."""
    return a.shape == b.shape and all(
        sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


def flat_view(t):
    """The 1-D view of a dense tensor's memory, in memory order (torch has no negative
    strides, so that memory starts at the storage offset)."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


CONTIGUOUS, PERMUTED, SCATTERED = "contiguous", "permuted", "scattered"
# A contiguous parameter that is a plain real tensor: a plain real contiguous gradient or
# state tensor of it is its own operand, with no further look (the fast path of a step).
PLAIN = "plain"


def _is_plain(t):
    """t is a contiguous real tensor of a plain type (not a DTensor, not complex)."""
    return (type(t) in PLAIN_TYPES and t.is_contiguous() and not t.is_complex())


def layout_of(t):
    """CONTIGUOUS, PERMUTED (dense in another memory order) or SCATTERED (not dense)."""
    if t.is_contiguous():
        return CONTIGUOUS
    return PERMUTED if is_dense(t) else SCATTERED


@dataclasses.dataclass
class Bucket:
    """One param group's tensors of one device and dtype, as op operands.

    ``params`` are the parameters (the keys of the optimizer's state) and ``states`` their
    state dicts as the step found them (None: no state yet); ``p``, ``grads_b`` and ``grads_lb``
    the operands in their place, one per parameter. ``scale_b`` and ``scale_lb`` are the
    factors of g = scale_lb * g_lb + scale_b * g_b (floats, or float64 tensors on the device:
    ``_scalars.py``).
    """
    group: dict
    device: torch.device
    dtype: torch.dtype
    params: list = dataclasses.field(default_factory=list)
    states: list = dataclasses.field(default_factory=list)
    p: list = dataclasses.field(default_factory=list)
    grads_b: list = dataclasses.field(default_factory=list)
    grads_lb: list = dataclasses.field(default_factory=list)
    scale_b: object = 0.0
    scale_lb: object = 1.0
    layouts: list = dataclasses.field(default_factory=list)
    local_params: list = dataclasses.field(default_factory=list)  # DTensors' local shards
    _write_backs: list = dataclasses.field(default_factory=list)

    def operand(self, i, tensor, written):
        """tensor (a gradient or state of parameter i) as an operand aligned with p[i]; a
        temporary that is ``written`` is copied back by write_back(). A DTensor stands for its
        local shard, a complex tensor for its real pairs."""
        tensor = elements(tensor)
        if self.layouts[i] == PERMUTED:
            param = self.local_params[i]
            if is_dense(tensor) and same_strides(tensor, param):
                return flat_view(tensor)
            temporary = torch.empty_like(param, memory_format=torch.preserve_format)
            temporary.copy_(tensor)
            result = flat_view(temporary)
        else:  # the parameter's operand is contiguous (itself, or a contiguous copy)
            if tensor.is_contiguous():
                return tensor
            temporary = result = tensor.contiguous()
        if written:
            self._write_backs.append((tensor, temporary))
        return result

    def operands(self, tensors, written, indices=None):
        """operand() for each tensor of the parameters at ``indices`` (default: all)."""
        indices = range(len(self.params)) if indices is None else indices
        layouts = self.layouts
        return [t if layouts[i] is PLAIN and _is_plain(t) else self.operand(i, t, written)
                for i, t in zip(indices, tensors)]

    def add(self, param, state, grad_b, grad_lb):
        """Appends a parameter (with its state dict, or None) whose gradients are grad_b and
        grad_lb (grad_lb None: zeros; grad_b None: grad_lb itself, for a step without a stash,
        whose scale_b is 0)."""
        self.states.append(state)
        if (_is_plain(param) and _is_plain(grad_lb)
                and (grad_b is None or _is_plain(grad_b))):
            # The common case, kept short: each tensor is its own operand.
            self.params.append(param)
            self.local_params.append(param)
            self.layouts.append(PLAIN)
            self.p.append(param)
            self.grads_lb.append(grad_lb)
            self.grads_b.append(grad_lb if grad_b is None else grad_b)
            return
        shard = elements(param)
        layout = layout_of(shard)
        self.params.append(param)
        self.local_params.append(shard)
        self.layouts.append(layout)
        if layout == CONTIGUOUS:
            self.p.append(shard)
        elif layout == PERMUTED:
            self.p.append(flat_view(shard))
        else:
            temporary = shard.contiguous()
            self._write_backs.append((shard, temporary))
            self.p.append(temporary)
        i = len(self.params) - 1
        if grad_lb is None:
            grad_lb = torch.zeros_like(shard, memory_format=torch.preserve_format)
        self.grads_lb.append(self.operand(i, grad_lb, written=False))
        self.grads_b.append(self.grads_lb[-1] if grad_b is None else
                            self.operand(i, grad_b, written=False))

    def write_back(self):
        """Copies what the op wrote into temporaries back into the tensors they stand for."""
        for tensor, temporary in self._write_backs:
            tensor.copy_(temporary)
        self._write_backs.clear()


def _check_gradient(name, g, shape, dtype, device):
    """g (a gradient of a parameter of this shape, dtype and device) is dense and matches it."""
    if g.is_sparse:
        raise RuntimeError(f"{name} of a parameter of shape {tuple(shape)} is sparse; GERNE "
                           "does not support sparse gradients: use dense embeddings "
                           "(sparse=False)")
    if g.shape != shape or g.dtype != dtype or g.device != device:
        raise RuntimeError(
            f"{name} of a parameter of shape {tuple(shape)} ({dtype}, {device}) has shape "
            f"{tuple(g.shape)} ({g.dtype}, {g.device}); gradients must match their parameter's "
            "shape, dtype and device")


def gather(group, state, has_stash):
    """The group's Buckets per (device, dtype), in order of first appearance. A parameter with
    neither gradient is left out; a missing one is zeros, except that without any stash (lean
    mode, beta = 0) g_b is g_lb itself (its scale is 0: no buffer needed)."""
    buckets = {}
    for p in group["params"]:
        p_state = state.get(p)
        g_b = p_state.get("grad_b") if p_state else None
        g_lb = p.grad
        if g_b is None and g_lb is None:
            continue
        shape, dtype, device = p.shape, p.dtype, p.device
        if g_b is not None:
            _check_gradient("g_b", g_b, shape, dtype, device)
        if g_lb is not None:
            _check_gradient("g_lb", g_lb, shape, dtype, device)
        real = dtype.to_real() if dtype.is_complex else dtype
        bucket = buckets.get((device, real))
        if bucket is None:
            bucket = buckets[device, real] = Bucket(group, device, real)
        if g_b is None and has_stash:
            g_b = torch.zeros_like(local(p), memory_format=torch.preserve_format)
        bucket.add(p, p_state, g_b, g_lb)
    return list(buckets.values())


def by_device(buckets):
    """{device: [buckets on it]} in order of first appearance."""
    out = defaultdict(list)
    for bucket in buckets:
        out[bucket.device].append(bucket)
    return out
