"""The base optimizers GERNE feeds its extrapolated gradient to, by name:
``GERNE(params, optimizer=NAME, ...)`` looks NAME up here. A new base optimizer is a module
with its defaults, checks, state and op call (see base_optimizer.py) and one entry below."""

from .adam import Adam
from .lion import Lion
from .sgd import SGD

REGISTRY = {entry.name: entry for entry in (
    SGD(),
    Adam("adam", decoupled=False, weight_decay=0.0),
    Adam("adamw", decoupled=True, weight_decay=1e-2),
    Lion(),
)}
