"""The ``backend`` fixture of the op tests: one Backend of harness.BACKENDS per test, skipped
(or failed, where it must run) when it cannot run here. Tests parametrize it indirectly to run
on some backends only (harness.over_backends, harness.on_gpu, harness.over_cases)."""

import os

import pytest

import harness

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=harness.backend_params())
def backend(request):
    request.param.require()
    return request.param


def pytest_collection_modifyitems(items):
    # Triton's interpreter computes in numpy, which warns where a GPU silently makes inf or NaN
    # (an Adam tensor never stepped has bias corrections 1 - beta^0 = 0 in masked-off lanes).
    for item in items:
        if os.path.dirname(str(item.path)) == HERE:
            item.add_marker(pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning"))
