"""Debiasing methods as strategies over one model and one loop.

GERNE and the baselines it is compared to (ERM, group reweighting, group resampling,
GroupDRO, JTT), each a :class:`Strategy` run by :func:`train` with the same model,
optimizer settings and step budget. See each module for the method's formula.
"""
from .base import Batch, OptimizerSettings, StepContext, Strategy, TrainSetup
from .data import DatasetSource, TensorSource
from .erm import ERM
from .gerne import GERNEStrategy, GroupResampling
from .gerne_unknown import BiasedLogits, GERNEUnknown, biased_model_logits
from .group_dro import GroupDRO, group_losses
from .jtt import JTT, error_set, first_stage_error_sets, upweights
from .loop import LoopSettings, TrainResult, evaluate, train
from .reweighting import GroupReweighting, group_weights

__all__ = [
    "Batch", "OptimizerSettings", "StepContext", "Strategy", "TrainSetup", "DatasetSource",
    "TensorSource", "ERM", "GERNEStrategy", "GroupResampling", "GERNEUnknown",
    "BiasedLogits", "biased_model_logits", "GroupDRO", "group_losses", "JTT", "error_set",
    "first_stage_error_sets", "upweights", "LoopSettings", "TrainResult", "evaluate", "train",
    "GroupReweighting", "group_weights",
]
