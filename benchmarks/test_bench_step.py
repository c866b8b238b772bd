"""pytest-benchmark cases for one GERNE step, and bench_step.py end to end on tiny problems.

    pytest benchmarks/ --benchmark-disable      # smoke test (CI): every case runs once
    pytest benchmarks/                          # timings, small problem (2^16 params, 20 tensors)

The full benchmark with the bandwidth floor, the sweeps and the training iteration is
`python benchmarks/bench_step.py`.
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


@pytest.mark.parametrize("optimizer", bench_step.ALL_OPTIMIZERS)
def test_step(benchmark, optimizer):
    steps = bench_step.variants_for(optimizer, NUMEL, TENSORS, with_reference=True,
                                    compile_lion=False)
    benchmark.group = f"{optimizer} step, 2^16 float32 params in {TENSORS} tensors"
    benchmark(lambda: [step() for step in steps.values()])


def test_bench_script_quick_run(tmp_path):
    """The script end to end on a tiny problem: every optimizer and variant, JSON."""
    json_path = tmp_path / "bench.json"
    results = bench_step.main(["--quick", "--numel-log2", "12", "--sizes", "10", "--counts", "7",
                               "--repeats", "1", "--bandwidth-log2", "16", "--no-compile",
                               "--json", str(json_path)])
    assert json_path.stat().st_size > 0
    main = {(r["optimizer"], r["variant"]) for r in results["main"]}
    variants = {"reference", "torch_only", "torch_only_checked", "fused_op", "gerne_step",
                "gerne_step_guarded", "gerne_step_tensor_scalars"}
    assert main == {(o, v) for o in bench_step.ALL_OPTIMIZERS for v in variants}
    assert all(r["ms"] > 0 and r["floor_fraction"] > 0 for r in results["main"])
    assert all("torch_only" in r["speedups"] for r in results["main"])
    assert len(results["size_sweep"]) == len(results["count_sweep"]) == 3 * (len(variants) - 1)


def test_training_iteration_mode():
    """--training on a tiny Linear stack: step and iteration times for each variant."""
    results = bench_step.main(["--training", "--layers", "2", "--width", "32", "--batch", "4",
                               "--repeats", "2", "--optimizers", "sgd,lion"])
    rows = {(r["optimizer"], r["variant"]): r for r in results["training"]}
    assert set(rows) == {(o, v) for o in ("sgd", "lion")
                         for v in ("torch_only", "fused_op", "gerne", "gerne_guarded")}
    assert all(0 < r["step_ms"] < r["iteration_ms"] for r in rows.values())
