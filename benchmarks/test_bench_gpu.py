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
LARGE_VARIANTS = ["cuda", "cuda_checked", "cuda_tensor_scalars", "triton", "triton_per_tensor",
                  "torch_fused", "gerne_step", "gerne_step_device_scalars", "reference"]
SMALL_VARIANTS = ["cuda_checked", "cuda", "torch_adamw_fused_alone", "torch_fused", "triton"]


@pytest.mark.skipif(not _backends.status("cpu")[0], reason="the cpu backend is not built")
def test_bench_gpu_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(HERE, "bench_gpu.py"), "--cpu-smoke",
                             "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    large = {(row["optimizer"], row["variant"]) for row in report["large"] if "ms" in row}
    assert large == {(o, v) for o in ("sgd", "adamw") for v in LARGE_VARIANTS}
    assert [row["variant"] for row in report["small"]] == SMALL_VARIANTS
    assert all(row["ms"] > 0 for row in report["large"] + report["small"])
    # Every target of the issue is judged, for both backends.
    targets = {(t["backend"], t["target"]) for t in report["targets"]}
    assert len(targets) == 7 + 5  # cuda: 3 per optimizer + small; triton: 2 per optimizer + small
    markdown = (tmp_path / "bench_gpu.md").read_text()
    assert "CPU smoke run (not a GPU)" in markdown
    assert markdown.count("| sgd, 2^14 params in 20 tensors |") == len(LARGE_VARIANTS)
    assert 'backend="auto" on CUDA, by this run:' in markdown  # cuda and triton both ran
