"""Smoke test of examples/train.py with tiny sizes: the three gradient modes, AMP, the wrapper,
channels_last, clipping, statistics, checkpoints that resume exactly, and a 2-process DDP run."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"
TINY = ["--n-per-class", "12", "--batch-per-class", "2", "--width", "4", "--warmup", "2",
        "--log-every", "1", "--backend", "reference"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("gerne_example_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags", [
    ["--mode", "stash", "--amp", "bf16", "--statistics"],
    ["--mode", "lean", "--amp", "fp16", "--wrapper", "--optimizer", "adamw"],
    ["--mode", "one-backward", "--amp", "fp16", "--channels-last", "--max-grad-norm", "0.5"],
])
def test_runs_and_reports_group_metrics(example, capsys, flags):
    example.main(TINY + ["--steps", "3"] + flags)
    out = capsys.readouterr().out
    assert "step 3/3" in out and "test GBA" in out
    assert ("cos" in out) == ("--statistics" in flags)


def test_checkpoint_resumes_exactly(example, capsys, tmp_path):
    straight, resumed = str(tmp_path / "straight.pt"), str(tmp_path / "resumed.pt")
    example.main(TINY + ["--steps", "4", "--checkpoint", straight, "--amp", "fp16"])
    example.main(TINY + ["--steps", "4", "--checkpoint", resumed, "--amp", "fp16",
                         "--checkpoint-every", "2"])
    os.remove(resumed)  # ...so that this run stops at step 2 and the next one resumes there:
    example.main(TINY + ["--steps", "2", "--checkpoint", resumed, "--amp", "fp16"])
    capsys.readouterr()
    example.main(TINY + ["--steps", "4", "--checkpoint", resumed, "--amp", "fp16"])
    assert "resumed from" in capsys.readouterr().out
    a, b = (torch.load(path, weights_only=False) for path in (straight, resumed))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_ddp_two_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, str(SCRIPT), "--world-size", "2", "--steps", "2",
                          "--mode", "lean"] + TINY, capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2" in run.stdout and "test GBA" in run.stdout
