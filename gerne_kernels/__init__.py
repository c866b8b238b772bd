"""gerne_kernels: GERNE (gradient extrapolation for debiased representation learning) for PyTorch.

    opt = gerne_kernels.GERNE(model.parameters(), optimizer="sgd", lr=0.1, momentum=0.9, beta=1.0)
    opt.zero_grad(); loss_b.backward(); opt.stash_biased(); loss_lb.backward(); opt.step()
"""

from . import _ops  # noqa: F401  (declares the torch.library ops)
from ._backends import available_backends
from .optimizer import GERNE
from .statistics import GradientStatistics
from .wrapper import GERNEWrapper
from .sampler import TwoBatchSampler
from .bounds import BetaBounds, beta_bounds
from .pseudo_groups import pseudo_attributes, train_biased_model
from . import metrics, datasets, strategies

__version__ = "0.1.0"

__all__ = ["GERNE", "GERNEWrapper", "GradientStatistics", "available_backends",
           "TwoBatchSampler", "BetaBounds", "beta_bounds", "pseudo_attributes",
           "train_biased_model", "metrics", "datasets", "strategies"]
