"""Framework tests run offline, and each starts with a fresh accelerate state.

accelerate keeps its process state (device, mixed precision, gradient accumulation) in
singletons that every Accelerator, and every HF Trainer, shares; a test that changes them
must not leak into the next one.
"""

import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # integration_task


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def quiet_framework_warnings():
    """The frameworks' advice for real runs (num_workers, logging, small datasets) is noise
    for a 4-step CPU test; GERNE's own warnings still show."""
    with warnings.catch_warnings():
        for module in ("lightning", "pytorch_lightning", "transformers", "accelerate"):
            warnings.filterwarnings("ignore", module=module)
        yield
