"""bench_gpu.py's logic, checked on the CPU: a GPU run is rare and short, and a Python error in
the script would waste it. `--cpu-smoke` runs every stage at tiny sizes with the C++ CPU op
standing in for the CUDA op and the Triton kernels in the interpreter; the numbers mean nothing,
the table's shape does."""

import json
import os
import subprocess
import sys

import pytest

from gerne_kernels import _backends

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LARGE_VARIANTS = {"cuda_op", "triton_op", "torch_only", "gerne_step", "gerne_triton",
                  "gerne_device_scalars", "gerne_guarded"}
SMALL_VARIANTS = ["cuda_op", "triton_op", "torch_adamw_fused_alone", "torch_only"]


@pytest.mark.skipif(not _backends.status("cpu")[0], reason="the cpu backend is not built")
def test_bench_gpu_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(HERE, "bench_gpu.py"), "--cpu-smoke",
                             "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    large = {(row["optimizer"], row["dtype"], row["variant"]) for row in report["large"]}
    assert large == {(o, d, v) for o in ("sgd", "adamw", "lion")
                     for d in ("float32", "bfloat16") for v in LARGE_VARIANTS}
    assert [row["variant"] for row in report["small"]] == SMALL_VARIANTS
    assert all(row["ms"] > 0 for row in report["large"] + report["small"])
    assert all(row["max_error"] < 1e-2 for row in report["large"]
               if row["variant"] in ("cuda_op", "triton_op"))
    # Every target of the issue is judged, for both backends: per backend, 2 bandwidth rows
    # (sgd, adamw float32... and lion), the speedups of sgd and adamw in both dtypes, the
    # launch counts in float32, and the small-tensor row.
    targets = [(t["backend"], t["target"]) for t in report["targets"]]
    for backend in ("cuda", "triton"):
        mine = [t for b, t in targets if b == backend]
        assert len(mine) == 3 + 4 + 2 + 1, mine
    markdown = (tmp_path / "bench_gpu.md").read_text()
    assert "CPU smoke run (not a GPU)" in markdown
    assert 'backend="auto" on CUDA, by this run:' in markdown  # cuda and triton both ran
