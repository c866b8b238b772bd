import os
import warnings

import pytest
import torch

# Triton picks its interpreter when a kernel is decorated, i.e. when gerne_kernels.triton_kernels
# is first imported: without a GPU, the triton backend runs on CPU tensors in the interpreter,
# in this process (tests/ops runs every op test on it). Set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gerne_kernels import _backends  # noqa: E402


def cpu_backends():
    """The backends that run CPU tensors in this process: reference, and cpu if it builds."""
    names = ["reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _backends.status("cpu")[0]:
            names.append("cpu")
    return names


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
