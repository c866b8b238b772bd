"""Framework tests run offline, on one CPU thread, and each starts with a fresh accelerate state.

accelerate keeps its process state (device, mixed precision, gradient accumulation) in
singletons that every Accelerator, and every HF Trainer, shares; a test that changes them
must not leak into the next one.
"""

import os
import sys
import warnings

import pytest
import torch

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
def quiet_framework_deprecations():
    """The frameworks' own deprecation notices (Lightning 2.6 uses a torch.utils._pytree API
    that torch 2.14 deprecates) are not this project's; other warnings, GERNE's included, show."""
    with warnings.catch_warnings():
        for module in ("lightning", "transformers", "accelerate"):
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=module)
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' ops take microseconds; on two threads the intra-op pool's hand-offs
    cost 50 times more than the work (measured: 0.93 s against 0.013 s of CPU time per oracle
    run on a busy 2-core machine). Restored afterwards for the tests outside this folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
