"""What a base optimizer (SGD, Adam, Lion, ...) is to GERNE: an entry of the registry.

GERNE forms the extrapolated gradient g = (1 + beta) g_lb - beta g_b inside one fused op per
bucket of tensors; the base optimizer says which op, with which hyperparameters and state. Its
module holds, and nothing else in the package branches on it:

* ``defaults``: its hyperparameters with torch.optim's defaults, the keys of its param groups
  (GERNE adds beta and beta_bounds); ``fixed``: those it does not take as arguments;
* ``check(group, where)``: torch.optim's range checks of those hyperparameters;
* ``update(call)``: for one bucket, the state it creates (recorded in ``call.created``, so that
  a skipped step can remove it again) and the call of its op.
"""

import dataclasses

from .. import _scalars, hyperparameters as hp

# torch.optim's implementation flags, accepted as torch.optim accepts them (configs and timm's
# create_optimizer_v2 pass them). GERNE's step is always one fused, capturable pass whatever
# they say; it is not differentiable, so differentiable=True is refused.
TORCH_FLAGS = dict(foreach=None, fused=None, capturable=False, differentiable=False)


def check_torch_flags(group, where):
    for name in ("foreach", "fused"):
        if group.get(name) not in (None, True, False):
            raise TypeError(f"{name}{where} must be None, True or False, got {group[name]!r}")
    if group.get("differentiable"):
        raise ValueError(f"differentiable=True{where}: GERNE's fused step cannot be "
                         "differentiated through (torch.optim's differentiable mode); use "
                         "differentiable=False")


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

    def states(self):
        """The state dict of each of the bucket's parameters (created where there is none)."""
        return [self.state[p] if s is None else s
                for p, s in zip(self.bucket.params, self.bucket.states)]

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
    fixed = {}  # keys of the groups with a value the optimizer does not take as an argument

    def check(self, group, where, read_tensors=True):
        """torch.optim's checks of the group's hyperparameters (lr and the implementation
        flags here; a subclass adds its own)."""
        hp.check_lr(group, where, read_tensors)
        check_torch_flags(group, where)

    def load_state(self, param, state):
        """Brings a loaded checkpoint's state of param into the form the update uses (in place;
        by default it already is)."""

    def update(self, call):
        raise NotImplementedError
