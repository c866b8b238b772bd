import os
import warnings

import pytest
import torch

from gerne_kernels import _backends


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
