"""What CUDA graph capture asks of the Triton ops: no compiling or module loading while a stream
captures, and launch tables that stay valid for as long as a graph may replay.

Kernels. A launch that Triton has not compiled and loaded in this process would, during capture,
compile (seconds, fine) and then load a module into the CUDA context, which a capturing stream
does not permit. So every eager launch records its *variant* (kernel, constexprs, the dtype and
16-byte alignment of each pointer argument, launch options, device: what makes Triton compile
anew), and a launch during capture whose variant was never launched eagerly raises a
RuntimeError naming the fix: one eager step with the same settings first (torch's capture
recipe runs warm-up iterations on a side stream anyway).

Tables. A whole-step capture allocates the .grad tensors from the graph's private pool, so the
addresses, and with them the tables, are new: the eager table cache cannot help. Tables needed
during capture are therefore written into a host arena of pinned memory and copied to a device
arena by a copy recorded in the graph (it runs at every replay, reading the host arena then).
Both arenas are allocated on the first eager use of a device (pinning memory is not safe during
capture on every supported torch) and are bump-allocated, never freed, never reused and never
handed to eager calls: a graph may replay any time. CAPTURE_ARENA_BYTES bounds what all
captures of a process may use per device (a table is 8 bytes per tensor and column, about 100
bytes per tensor for Adam); an exhausted arena raises with that advice.

stream_is_capturing is the one question asked of CUDA; tests patch it to exercise the capture
path without a GPU (on CPU tensors the arenas are plain CPU memory).
"""

import dataclasses

import torch

CAPTURE_ARENA_BYTES = 4 << 20  # per device; set before the first eager call to change it
_ALIGNMENT = 64  # bytes between tables in the arena: 16-byte vector loads, distinct lines


def stream_is_capturing(device):
    """Whether the current stream of ``device`` (the current device: the ops launch under a
    device guard) is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# Kernel variants launched eagerly

_launched_variants = set()


def record_launched(variant):
    """Notes a variant that has just been launched eagerly (so it is compiled and loaded)."""
    _launched_variants.add(variant)


def require_launched(variant):
    """During capture: raises for a variant never launched eagerly in this process."""
    if variant not in _launched_variants:
        kernel, device, signature, options = variant
        settings = ", ".join(f"{entry[0]}={'/'.join(map(str, entry[1:]))}"
                             for entry in signature + options)
        raise RuntimeError(
            f"gerne_kernels (triton): {kernel} would be compiled or loaded during CUDA graph "
            f"capture on {device}, which CUDA does not permit: this variant ({settings}) has "
            "not run eagerly in this process. Run one "
            "eager step with the same settings and dtypes first (torch's capture recipe does: "
            "warm-up iterations on a side stream before torch.cuda.graph).")


# ---------------------------------------------------------------------------------------------
# The arenas for tables read by captured graphs

@dataclasses.dataclass
class CaptureArena:
    """A pinned host buffer and a device buffer of the same size, handed out front to back."""
    host: torch.Tensor    # int64, pinned on CUDA devices
    device: torch.Tensor  # int64
    used: int = 0         # int64 elements handed out

    def table(self, values, width):
        """A device table [len(values) // width, width] filled with ``values`` by a copy
        enqueued on the current stream (recorded into the graph during capture)."""
        n = len(values)
        stride = _ALIGNMENT // 8
        start = -(-self.used // stride) * stride
        if start + n > self.host.numel():
            raise RuntimeError(
                f"gerne_kernels (triton): the CUDA graph capture arena of {self.device.device} "
                f"is full ({self.host.numel() * 8} bytes; captured graphs keep their tables for "
                "the life of the process). Set gerne_kernels.triton_kernels.graph_capture."
                "CAPTURE_ARENA_BYTES higher before the first step, or capture fewer graphs.")
        self.used = start + n
        host = self.host[start:start + n]
        host.copy_(torch.tensor(values, dtype=torch.int64))
        device = self.device[start:start + n]
        device.copy_(host, non_blocking=True)
        return device.view(n // width, width)


_arenas = {}


def ensure_arena(device):
    """Allocates ``device``'s capture arena on its first eager use."""
    if device not in _arenas:
        elements = CAPTURE_ARENA_BYTES // 8
        _arenas[device] = CaptureArena(
            host=torch.empty(elements, dtype=torch.int64, pin_memory=device.type == "cuda"),
            device=torch.empty(elements, dtype=torch.int64, device=device))


def capture_table(device, values, width):
    """A table for a launch being captured: from ``device``'s arena, never reused."""
    arena = _arenas.get(device)
    if arena is None:
        raise RuntimeError(
            f"gerne_kernels (triton): no eager call has run on {device} before this CUDA graph "
            "capture, so there is no capture arena for its tables (it cannot be allocated "
            "during capture). Run one eager step with the same settings first.")
    return arena.table(values, width)
