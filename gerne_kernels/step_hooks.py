"""torch.optim's step() protocol, without the fixed cost of torch's wrapper when nothing listens.

torch.optim wraps the step() of every optimizer class (``Optimizer.profile_hook_step``, applied
by ``Optimizer.__init__`` unless ``step.hooked`` is set) to run the step hooks
(``register_step_pre_hook``/``register_step_post_hook`` and the global
``register_optimizer_step_pre_hook``/``post_hook``) and to label the step for the profiler
(``record_function("Optimizer.step#GERNE.step")``). The label alone enters and leaves a
RecordFunction through the op dispatcher at every step: in a training iteration, right after a
backward has streamed the caches full of gradients, that wrapper took about 0.2 ms of a 7 ms
GERNE step (benchmarks/RESULTS.md), as much as the rest of the step's Python.

``with_step_hooks`` gives the step the same protocol itself, in torch's order and with torch's
arguments (a pre-hook sees ``args`` with the optimizer first, and may return new ``(args,
kwargs)``), but labels the step only while a profiler records and touches nothing when no hook
is registered. A subclass that overrides step() is wrapped by torch as usual; its step then runs
the protocol and this one stands aside, so that hooks run once.
"""

import contextlib
import functools
import itertools

import torch
from torch.optim import optimizer as _torch_optimizer


def _profiling():
    return getattr(torch.autograd.profiler, "_is_profiler_enabled", True)


def with_step_hooks(step):
    """step, with torch.optim's hooks and profiler label (see the module docstring)."""

    @functools.wraps(step)
    def hooked_step(self, *args, **kwargs):
        if type(self).step is not hooked_step:  # an overriding step, wrapped by torch
            return step(self, *args, **kwargs)
        global_pre = _torch_optimizer._global_optimizer_pre_hooks
        global_post = _torch_optimizer._global_optimizer_post_hooks
        if not (global_pre or global_post or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _profiling()):
            return step(self, *args, **kwargs)
        args = (self, *args)
        label = f"Optimizer.step#{type(self).__name__}.step"
        with (torch.autograd.profiler.record_function(label) if _profiling()
              else contextlib.nullcontext()):
            for pre_hook in itertools.chain(global_pre.values(),
                                            self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"{step} must return None or a tuple of (new_args, "
                                           f"new_kwargs), but got {result}.")
                    args, kwargs = result
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                             global_post.values()):
                post_hook(self, args, kwargs)
            return out

    hooked_step.hooked = True  # torch.optim's mark: Optimizer.__init__ leaves it unwrapped
    return hooked_step
