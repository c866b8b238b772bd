import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The conformance tests step tiny tensors: intra-op threads only add synchronisation,
    which on a loaded machine costs a hundred times the work. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
