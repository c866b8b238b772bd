"""pytest-benchmark cases for one GERNE step: the variants of bench_step.py on a small problem.

    pytest benchmarks/ --benchmark-disable      # smoke test (CI): every case runs once
    pytest benchmarks/                          # timings, small problem (2^16 params, 20 tensors)

The full benchmark with the bandwidth floor and the sweeps is `python benchmarks/bench_step.py`.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_step  # noqa: E402

from gerne_kernels import _build  # noqa: E402

NUMEL = 1 << 16
TENSORS = 20


@pytest.fixture(scope="module", autouse=True)
def cpu_built():
    built = _build.build("cpu")
    if not built.ok:
        message = f"the cpu extension failed to build: {built.error} (log: {built.log_path})"
        if os.environ.get("GERNE_KERNELS_REQUIRE_CPU") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("variant", bench_step.VARIANTS)
@pytest.mark.parametrize("optimizer", bench_step.OPTIMIZERS)
def test_step(benchmark, optimizer, variant):
    step = bench_step.make_step(optimizer, variant, NUMEL, TENSORS)
    benchmark.group = f"{optimizer} step, 2^16 float32 params in {TENSORS} tensors"
    benchmark(step)


def test_bench_script_quick_run(tmp_path):
    """The script end to end on a tiny problem: table, JSON and plot."""
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    results = bench_step.main(["--quick", "--numel-log2", "12", "--sizes", "10,12",
                               "--counts", "1,7", "--repeats", "1", "--bandwidth-log2", "16",
                               "--json", str(json_path), "--plot", str(plot_path)])
    assert json_path.stat().st_size > 0 and plot_path.stat().st_size > 0
    main = {(r["optimizer"], r["variant"]): r for r in results["main"]}
    assert set(main) == {(o, v) for o in bench_step.OPTIMIZERS for v in bench_step.VARIANTS}
    assert all(r["ms"] > 0 and r["floor_fraction"] > 0 for r in main.values())
