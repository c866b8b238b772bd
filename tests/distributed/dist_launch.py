"""The launcher of the multi-process tests: 2 CPU processes joined by gloo on 127.0.0.1.

``spawn(fn, tmp_path, *args)`` starts WORLD processes (torch.multiprocessing, start method
"spawn": each child imports torch afresh, which dominates the run time, so a test batches many
checks into one call), initialises the default process group in each, runs
``fn(rank, out_dir, *args)`` and returns the list of what each rank's fn returned (saved with
torch.save, so tensors, dicts and lists). fn must be a module-level function of an importable
module (the children import it by name; they inherit the parent's sys.path).
"""

import datetime
import os
import socket

import pytest
import torch

WORLD = 2
TIMEOUT_S = 120
# The backend the distributed tests run GERNE on (the children inherit it): "reference" by
# default, so that they test the distributed logic whatever state the compiled kernels are in.
BACKEND = os.environ.get("GERNE_DIST_TEST_BACKEND", "reference")

requires_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(x, rank, world=WORLD):
    """This rank's part of a batch: the union over the ranks is x."""
    return x.chunk(world)[rank]


def _entry(rank, fn, port, out_dir, args):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear down together: gloo may abort a rank whose peer has gone
    finally:
        dist.destroy_process_group()


def spawn(fn, tmp_path, *args):
    """Runs fn(rank, out_dir, *args) on WORLD gloo ranks; returns the ranks' results."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path)
    mp.spawn(_entry, args=(fn, free_port(), out_dir, args), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]
