"""What a base optimizer (SGD, Adam, Lion, ...) is to GERNE: an entry of the registry.

GERNE forms the extrapolated gradient g = (1 + beta) g_lb - beta g_b inside one fused op per
bucket of tensors; the base optimizer says which op, with which hyperparameters and state. Its
module holds, and nothing else in the package branches on it:

* ``defaults``: its hyperparameters with torch.optim's defaults (GERNE adds beta and
  beta_bounds);
* ``check(group, where)``: torch.optim's range checks of those hyperparameters;
* ``update(call)``: for one bucket, the state it creates (recorded in ``call.created``, so that
  a skipped step can remove it again) and the call of its op.
"""

import dataclasses

from .. import _scalars


@dataclasses.dataclass
class UpdateCall:
    """One bucket's update, as a base optimizer's ``update`` receives it.

    impl: the backend's ops (``impl.op("sgd_step_")``, with the overload that matches the
        scalars); bucket: the tensors (``buckets.Bucket``); state: the optimizer's per-parameter
        state; found_inf: the flag the op reads (non-zero: change nothing); created: the
        (parameter, keys) of state created for this step, removed again if it is skipped.
    """
    impl: object
    bucket: object
    state: dict
    found_inf: object
    created: list

    def scalars(self):
        """lr, scale_b and scale_lb as the op's overload takes them: floats, or (when the
        scales are device tensors) float64 tensors on the bucket's device."""
        lr = self.bucket.group["lr"]
        if _scalars.any_tensor(self.bucket.scale_b, self.bucket.scale_lb):
            lr = _scalars.on_device(lr, self.bucket.device)
        else:
            lr = float(lr)
        return dict(lr=lr, scale_b=self.bucket.scale_b, scale_lb=self.bucket.scale_lb)

    def new_state(self, param, **tensors):
        """Adds state tensors to a parameter's state and records them as created."""
        self.state[param].update(tensors)
        self.created.append((param, tuple(tensors)))


class BaseOptimizer:
    """A registry entry; see the module docstring. Subclasses set ``name``, ``op`` and
    ``defaults`` and implement ``check`` and ``update``."""
    name = None
    op = None
    defaults = {}

    def check(self, group, where):
        raise NotImplementedError

    def update(self, call):
        raise NotImplementedError
