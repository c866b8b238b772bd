"""The GERNE optimizer behind a framework's optimizer wrapper.

accelerate's ``AcceleratedOptimizer`` (what HF Trainer's ``trainer.optimizer`` is once training
starts) keeps the optimizer as ``.optimizer`` and forwards only torch.optim's methods, so
``stash_biased()`` and ``extrapolated_loss()`` are reached through it. Lightning's
``LightningOptimizer`` keeps it as ``._optimizer`` (its class imitates the optimizer's, so
GERNE's methods work on it directly; the unwrapped one is returned all the same).
"""

from ..two_batch import TwoBatchOptimizer

# The instance attributes under which wrappers keep the optimizer they wrap:
# LightningOptimizer and Fabric's _FabricOptimizer "_optimizer", AcceleratedOptimizer "optimizer".
WRAPPED_ATTRIBUTES = ("_optimizer", "optimizer")
MAX_WRAPPERS = 8


def _wrapped(optimizer):
    attributes = getattr(optimizer, "__dict__", {})
    for name in WRAPPED_ATTRIBUTES:
        inner = attributes.get(name)
        if inner is not None and inner is not optimizer:
            return inner
    return None


def two_batch_optimizer(optimizer):
    """The GERNE or GERNEWrapper inside ``optimizer`` (itself, or behind wrappers).

    Raises TypeError when there is none, naming what was found: a framework built its own
    optimizer (HF Trainer without ``optimizers=(opt, scheduler)``), or the base optimizer was
    passed instead of the GERNEWrapper.
    """
    current = optimizer
    for _ in range(MAX_WRAPPERS):
        inner = _wrapped(current)
        if inner is None:
            if isinstance(current, TwoBatchOptimizer):
                return current
            break
        current = inner
    raise TypeError(f"no GERNE optimizer in {type(optimizer).__name__} (innermost: "
                    f"{type(current).__name__}): give the framework gk.GERNE(...) or "
                    "gk.GERNEWrapper(base, ...) as its optimizer (HF Trainer: "
                    "optimizers=(opt, scheduler))")
