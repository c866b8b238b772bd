"""triton_sgd_step_: GERNE's extrapolated gradient followed by torch.optim.SGD, one pass.

Per element (math.py):  g = scale_lb * g_lb + scale_b * g_b;  then SGD with momentum,
dampening, nesterov, weight decay and maximize on g. lr, scale_b and scale_lb come by value or,
for the .tensor overload, from device memory (scalars.py). Parameters and momentum buffers are
read and written in their own dtype (float32, bfloat16, float16); the math is float32.
"""

import triton
import triton.language as tl

from . import _launch
from .finite_check import flag_nonfinite_per_tensor
from .math import extrapolated_grad, sgd_update
from .scalars import launch_scalars, runtime_float
from .storage import load_f32, store_f32
from .tables import remaining_elements, table_pointer, update_chunk

OP_NAME = "triton_sgd_step_"
# Pointer-table columns of the multi-tensor launch; numel follows in the last column.
P, G_B, G_LB, BUF = (tl.constexpr(column) for column in range(4))
WIDTH = tl.constexpr(5)


@triton.jit
def sgd_chunk(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
              one_minus_dampening, weight_decay, BLOCK: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr,
              SCALARS_IN_MEMORY: tl.constexpr):
    """Updates the first min(remaining, BLOCK) elements after the given pointers: a full block
    unmasked (vectorizable), a tensor's last block or a skipped step (remaining == 0) masked."""
    scale_b = runtime_float(scale_b, SCALARS_IN_MEMORY)
    scale_lb = runtime_float(scale_lb, SCALARS_IN_MEMORY)
    lr = runtime_float(lr, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
                  one_minus_dampening, weight_decay, BLOCK, False, HAS_MOMENTUM,
                  HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)
    else:
        sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
                  one_minus_dampening, weight_decay, BLOCK, True, HAS_MOMENTUM,
                  HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)


@triton.jit
def sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
              one_minus_dampening, weight_decay, BLOCK: tl.constexpr, MASKED: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining``."""
    offsets = tl.arange(0, BLOCK)
    g_b = load_f32(g_b_ptr, offsets, remaining, MASKED)
    g_lb = load_f32(g_lb_ptr, offsets, remaining, MASKED)
    p = load_f32(p_ptr, offsets, remaining, MASKED)
    buf = p  # not read: the first step sets buf = g, and without momentum there is no buffer
    if HAS_MOMENTUM:
        if not IS_FIRST_STEP:
            buf = load_f32(buf_ptr, offsets, remaining, MASKED)
    g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
    p, buf = sgd_update(p, buf, g, lr, momentum, one_minus_dampening, weight_decay,
                        HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)
    store_f32(p_ptr, offsets, p, remaining, MASKED)
    if HAS_MOMENTUM:
        store_f32(buf_ptr, offsets, buf, remaining, MASKED)


@triton.jit
def _sgd_multi_tensor_kernel(table_ptr, chunks_ptr, found_inf_ptr, p_like, g_b_like, g_lb_like,
                             buf_like, scale_b, scale_lb, lr, momentum, one_minus_dampening,
                             weight_decay, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                             HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                             NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                             IS_FIRST_STEP: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    row, base, remaining = update_chunk(table_ptr, chunks_ptr, found_inf_ptr, WIDTH, BLOCK)
    p_ptr = table_pointer(table_ptr, row, P, WIDTH, p_like, ALIGNED) + base
    g_b_ptr = table_pointer(table_ptr, row, G_B, WIDTH, g_b_like, ALIGNED) + base
    g_lb_ptr = table_pointer(table_ptr, row, G_LB, WIDTH, g_lb_like, ALIGNED) + base
    buf_ptr = table_pointer(table_ptr, row, BUF, WIDTH, buf_like, ALIGNED) + base
    sgd_chunk(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
              one_minus_dampening, weight_decay, BLOCK, HAS_MOMENTUM, HAS_WEIGHT_DECAY,
              NESTEROV, MAXIMIZE, IS_FIRST_STEP, SCALARS_IN_MEMORY)


@triton.jit
def _sgd_per_tensor_kernel(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, found_inf_ptr, numel, scale_b,
                           scale_lb, lr, momentum, one_minus_dampening, weight_decay,
                           BLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                           HAS_WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr,
                           MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr,
                           SCALARS_IN_MEMORY: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    remaining = remaining_elements(found_inf_ptr, numel, base)
    sgd_chunk(p_ptr + base, g_b_ptr + base, g_lb_ptr + base, buf_ptr + base, remaining, scale_b,
              scale_lb, lr, momentum, one_minus_dampening, weight_decay, BLOCK, HAS_MOMENTUM,
              HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP, SCALARS_IN_MEMORY)


@_launch.on_found_inf_device(4)
def sgd_step_(params, grads_b, grads_lb, momentum_buffers, found_inf, *, lr, momentum,
              dampening, nesterov, weight_decay, maximize, is_first_step, scale_b, scale_lb,
              check_finite):
    """The Triton implementation of gerne_kernels::triton_sgd_step_, both overloads (schema in
    _ops.py): lr, scale_b and scale_lb are floats, or tensors for .tensor."""
    device_index = _launch.check_found_inf(found_inf, OP_NAME)
    numels = [p.numel() for p in params]
    has_momentum = momentum != 0
    lists = dict(params=params, grads_b=grads_b, grads_lb=grads_lb)
    if has_momentum:
        lists["momentum_buffers"] = momentum_buffers
    dtypes = _launch.check_lists(OP_NAME, device_index, numels, **lists)
    if not params:
        return
    mode, block, num_warps = _launch.mode_for(found_inf, dtypes)
    scalars, tensor_scalars = launch_scalars(OP_NAME, found_inf, scale_b=scale_b,
                                             scale_lb=scale_lb, lr=lr)
    # Host-side scalars in double, rounded once to float32 at launch, as torch.optim does.
    scalars.update(momentum=float(momentum), one_minus_dampening=1.0 - float(dampening),
                   weight_decay=float(weight_decay))
    flags = dict(HAS_MOMENTUM=has_momentum, HAS_WEIGHT_DECAY=weight_decay != 0,
                 NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                 IS_FIRST_STEP=bool(is_first_step), SCALARS_IN_MEMORY=tensor_scalars)
    buffers = momentum_buffers if has_momentum else None
    prepared = None
    if mode == "multi_tensor":
        prepared = _launch.prepare_multi_tensor(
            found_inf, [params, grads_b, grads_lb, buffers], numels, g_b_column=G_B.value,
            g_lb_column=G_LB.value, check_finite=check_finite, block=block,
            num_warps=num_warps)
    if prepared is not None:
        table, chunks, aligned, likes = prepared
        if chunks.shape[0]:
            _sgd_multi_tensor_kernel[(chunks.shape[0],)](
                table, chunks, found_inf, *likes, **scalars, BLOCK=block, ALIGNED=aligned,
                **flags, num_warps=num_warps)
        return
    if check_finite:
        flag_nonfinite_per_tensor(grads_b, grads_lb, found_inf, block=block,
                                  num_warps=num_warps)
    for i, p in enumerate(params):
        if numels[i]:
            buf = buffers[i] if has_momentum else p
            _sgd_per_tensor_kernel[(triton.cdiv(numels[i], block),)](
                p, grads_b[i], grads_lb[i], buf, found_inf, numels[i], **scalars, BLOCK=block,
                **flags, num_warps=num_warps)
