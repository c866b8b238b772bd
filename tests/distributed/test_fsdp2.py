"""GERNE under FSDP2 (torch.distributed.fsdp.fully_shard: DTensor parameters, gradients and state,
each rank holding a shard) on 2 CPU processes with gloo, against one process training the full
model on the union of the ranks' batches with torch.optim (the oracle: .grad = (1 + beta) g_lb -
beta g_b, torch.nn.utils.clip_grad_norm_, norms and cosines computed from the full gradients).

The fused update runs on the local shards; what is not element-wise must be global: a step with
an inf on one rank only is skipped on both (skip_nonfinite=True), clipping uses the norm of the
whole g (opt.grad_norm equals the single-process norm), the statistics are those of the whole
gradients. accumulate_biased() over interleaved micro-batch pairs works with FSDP2's gradient
sync on and is refused without it (FSDP2 then mixes both batches' gradients in its own buffer);
the stash mode accumulates each batch with FSDP2's sync on its last micro-batch only.
Norms over DTensor and plain parameters together are refused. And torch.distributed.checkpoint
(get_state_dict, dcp.save, dcp.load, set_state_dict) resumes a sharded run bit-identically, from
a fresh optimizer (DCP's lr = 0 priming step), between steps and with a stash pending.

One spawn runs every check (process start-up dominates the run time); the tests read its
results.
"""

import math
import os

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import gradients, loss_of, make_batches, make_model
from dist_launch import BACKEND, WORLD, requires_gloo, shard, spawn

pytestmark = requires_gloo

BETA = 1.5
STEPS = 3
INJECT_AT = 1  # the step whose gradient gets an inf on rank 0 only
CLIP = 0.05    # small enough that every step clips

# kind: (GERNE optimizer on params, its oracle: the torch.optim optimizer fed g)
KINDS = {
    "gerne-sgd": (lambda ps, **kw: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9, beta=BETA,
                                            backend=BACKEND, **kw),
                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "gerne-adamw": (lambda ps, **kw: gk.GERNE(ps, optimizer="adamw", lr=1e-2, beta=BETA,
                                              backend=BACKEND, **kw),
                    lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "wrapper-adamw": (lambda ps, **kw: gk.GERNEWrapper(torch.optim.AdamW(ps, lr=1e-2), beta=BETA,
                                                       backend=BACKEND, **kw),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
}
# (kind, mode, max_grad_norm): every one with skip_nonfinite=True and an inf injected at
# INJECT_AT on rank 0; the stash mode also tracks statistics
CONFIGS = [(kind, mode, clip) for kind in KINDS for mode in ("stash", "one-backward")
           for clip in (None, CLIP)] + [("gerne-adamw", "lean", None),
                                        ("gerne-adamw", "accumulate", CLIP),
                                        ("gerne-sgd", "stash-no-sync", CLIP)]
STASH_MODES = ("stash", "accumulate", "stash-no-sync")
DCP_KINDS = ["gerne-sgd", "gerne-adamw", "wrapper-adamw"]


# ------------------------------------------------------------------------------------------
# What the ranks run

def sharded_model(mesh, seed=1):
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed=seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def inject_inf(model):
    """An inf in this rank's shard of the first parameter's .grad (the other rank's is finite)."""
    next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")


def first_half(model, opt, x_b, rank, inject):
    opt.zero_grad()
    loss_of(model, shard(x_b, rank)).backward()
    if inject:
        inject_inf(model)
    opt.stash_biased()


def fsdp_step(model, opt, mode, x_b, x_lb, rank, inject=False):
    if mode == "stash":
        first_half(model, opt, x_b, rank, inject)
        loss_of(model, shard(x_lb, rank)).backward()
    elif mode == "accumulate":  # 2 interleaved micro-batch pairs, every backward synced
        opt.zero_grad()
        for mb_b, mb_lb in zip(shard(x_b, rank).chunk(2), shard(x_lb, rank).chunk(2)):
            with opt.accumulate_biased():
                (loss_of(model, mb_b) / 2).backward()
            (loss_of(model, mb_lb) / 2).backward()
        if inject:
            inject_inf(model)
    elif mode == "stash-no-sync":  # each batch over 2 micro-batches, FSDP2 syncing the last
        opt.zero_grad()
        for x, biased in ((x_b, True), (x_lb, False)):
            micro = shard(x, rank).chunk(2)
            for j, mb in enumerate(micro):
                model.set_requires_gradient_sync(j == len(micro) - 1)
                (loss_of(model, mb) / 2).backward()
            if biased:
                if inject:
                    inject_inf(model)
                opt.stash_biased()
    elif mode == "one-backward":
        opt.zero_grad()
        opt.extrapolated_loss(loss_of(model, shard(x_b, rank)),
                              loss_of(model, shard(x_lb, rank))).backward()
        if inject:
            inject_inf(model)
    else:
        opt.zero_grad()
        opt.backward_biased(loss_of(model, shard(x_b, rank)))
        opt.backward_less_biased(loss_of(model, shard(x_lb, rank)))
        if inject:
            inject_inf(model)
    opt.step()


def full_params(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def train(rank, mesh, kind, mode, clip):
    model = sharded_model(mesh)
    opt = KINDS[kind][0](model.parameters(), skip_nonfinite=True, max_grad_norm=clip,
                         track_statistics=mode in STASH_MODES)
    norms, stats = [], []
    for i, (x_b, x_lb) in enumerate(make_batches(STEPS)):
        fsdp_step(model, opt, mode, x_b, x_lb, rank, inject=i == INJECT_AT and rank == 0)
        norms.append(None if opt.grad_norm is None else float(opt.grad_norm))
        stats.append(None if opt.statistics is None else opt.statistics.as_floats())
    return {"params": full_params(model), "norms": norms, "stats": stats,
            "skipped": opt.skipped_steps}


def checkpointed(rank, mesh, out_dir, kind, pending_stash):
    """Trains 4 steps (an inf skips step 1), checkpointing with dcp.save after step 2 (or in
    step 2, between stash_biased() and the second backward) and resuming in a freshly built
    sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = make_batches(4)
    model = sharded_model(mesh)
    opt = KINDS[kind][0](model.parameters(), skip_nonfinite=True)
    out = {}
    for i, (x_b, x_lb) in enumerate(batches):
        inject = i == 1 and rank == 0
        if i == 2:
            if pending_stash:
                first_half(model, opt, x_b, rank, inject)
            else:
                opt.zero_grad()  # no .grad: DCP's priming check runs on a trained optimizer
            model_sd, optim_sd = get_state_dict(model, opt)
            path = os.path.join(out_dir, f"{kind}-{pending_stash}")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
            model = sharded_model(mesh, seed=3)
            opt = KINDS[kind][0](model.parameters(), skip_nonfinite=True)
            before = [p.to_local().clone() for p in model.parameters()]
            model_sd, optim_sd = get_state_dict(model, opt)  # a fresh optimizer: DCP primes it
            out["priming_moved"] = any(not torch.equal(b, p.to_local())
                                       for b, p in zip(before, model.parameters()))
            if pending_stash:  # the template needs slots for the stash: dcp.load fills only those
                for name, p in model.named_parameters():
                    optim_sd["state"][name]["grad_b"] = torch.empty_like(p)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            out["skipped_after_load"] = opt.skipped_steps
            out["stash_after_load"] = opt.has_stash()
            if pending_stash:
                loss_of(model, shard(x_lb, rank)).backward()
                opt.step()
                continue
        fsdp_step(model, opt, "stash", x_b, x_lb, rank, inject)
    out["params"] = full_params(model)
    return out


def uninterrupted(rank, mesh, kind):
    model = sharded_model(mesh)
    opt = KINDS[kind][0](model.parameters(), skip_nonfinite=True)
    for i, (x_b, x_lb) in enumerate(make_batches(4)):
        fsdp_step(model, opt, "stash", x_b, x_lb, rank, inject=i == 1 and rank == 0)
    return full_params(model)


def mixed_step_error(rank, mesh):
    """Clipping over DTensor parameters and a plain one, whose sums no rank shares."""
    model = sharded_model(mesh)
    plain = torch.nn.Parameter(torch.ones(3))
    opt = KINDS["gerne-sgd"][0](list(model.parameters()) + [plain], max_grad_norm=1.0)
    (x_b, x_lb), = make_batches(1)
    for x in (x_b, x_lb):
        (loss_of(model, shard(x, rank)) + plain.square().sum()).backward()
        if x is x_b:
            opt.stash_biased()
    before = [p.to_local().clone() for p in model.parameters()]
    try:
        opt.step()
    except RuntimeError as error:
        unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
        return str(error), unchanged
    return None, None


def unsynced_accumulation_error(rank, mesh):
    """accumulate_biased() around a backward without FSDP2's gradient sync."""
    model = sharded_model(mesh)
    opt = KINDS["gerne-sgd"][0](model.parameters())
    (x_b, _), = make_batches(1)
    model.set_requires_gradient_sync(False)
    try:
        with opt.accumulate_biased():
            loss_of(model, shard(x_b, rank)).backward()
    except RuntimeError as error:
        return str(error)
    finally:
        model.set_requires_gradient_sync(True)
    return None


def worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    return {
        "train": [train(rank, mesh, *config) for config in CONFIGS],
        "mixed": mixed_step_error(rank, mesh),
        "unsynced": unsynced_accumulation_error(rank, mesh),
        "dcp": {kind: {"uninterrupted": uninterrupted(rank, mesh, kind),
                       "between-steps": checkpointed(rank, mesh, out_dir, kind, False),
                       "stash-pending": checkpointed(rank, mesh, out_dir, kind, True)}
                for kind in DCP_KINDS},
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(worker, tmp_path_factory.mktemp("fsdp2"))


# ------------------------------------------------------------------------------------------
# The oracle: one process, the full model, the union of the batches, torch.optim

def flat(tensors):
    return torch.cat([t.double().reshape(-1) for t in tensors])


def oracle(kind, clip):
    model = make_model()
    base = KINDS[kind][1](model.parameters())
    norms, stats = [], []
    for i, (x_b, x_lb) in enumerate(make_batches(STEPS)):
        g_b, g_lb = gradients(model, x_b), gradients(model, x_lb)
        if i == INJECT_AT:  # skipped: nothing changes
            norms.append(math.nan)
            stats.append(None)
            continue
        b, lb = flat(g_b), flat(g_lb)
        g = (1 + BETA) * lb - BETA * b
        stats.append({"norm_b": b.norm().item(), "norm_lb": lb.norm().item(),
                      "norm": g.norm().item(),
                      "cos": (b @ lb / (b.norm() * lb.norm())).item()})
        for p, gb, glb in zip(model.parameters(), g_b, g_lb):
            p.grad = (1 + BETA) * glb - BETA * gb
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            assert norms[-1] > clip  # the clip is active
        base.step()
    return [p.detach() for p in model.parameters()], norms, stats


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index", range(len(CONFIGS)),
                         ids=["-".join(map(str, config)) for config in CONFIGS])
def test_sharded_training_equals_one_process_on_the_union(ranks, index):
    """Parameters, the inf on one rank skipping the step on both, the clipped norm and the
    statistics, each rank against the oracle."""
    kind, mode, clip = CONFIGS[index]
    params, norms, stats = oracle(kind, clip)
    for rank, result in enumerate(ranks):
        got = result["train"][index]
        for p, q in zip(got["params"], params):
            close(p, q)
        assert got["skipped"] == 1, f"rank {rank} skipped {got['skipped']} steps, not 1"
        for i in range(STEPS):
            if clip is None:
                assert got["norms"][i] is None
            elif i == INJECT_AT:
                assert not math.isfinite(got["norms"][i])
            else:
                assert got["norms"][i] == pytest.approx(norms[i], rel=1e-5)
            if mode not in STASH_MODES:
                assert got["stats"][i] is None
            elif i != INJECT_AT:
                assert got["stats"][i] == pytest.approx(stats[i], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", DCP_KINDS)
@pytest.mark.parametrize("when", ["between-steps", "stash-pending"])
def test_dcp_resumes_a_sharded_run_bit_identically(ranks, kind, when):
    for rank, result in enumerate(ranks):
        run = result["dcp"][kind]
        resumed = run[when]
        assert not resumed["priming_moved"], "DCP's priming step moved a parameter"
        assert resumed["skipped_after_load"] == 1, "the skip count was not restored"
        assert resumed["stash_after_load"] == (when == "stash-pending")
        for p, q in zip(resumed["params"], run["uninterrupted"]):
            assert torch.equal(p, q), f"rank {rank}: the resumed run differs"


def test_norms_over_dtensors_and_plain_tensors_are_refused(ranks):
    for result in ranks:
        message, unchanged = result["mixed"]
        assert message is not None and "plain tensors next to DTensor" in message
        assert unchanged, "the refused step changed a parameter"


def test_accumulate_biased_without_fsdp_gradient_sync_is_refused(ranks):
    """Without sync FSDP2 keeps the biased gradient in its unsharded buffer, where the
    less-biased backwards would add to it: an error, not a mixed stash."""
    for result in ranks:
        assert result["unsynced"] is not None and "no sharded gradient" in result["unsynced"]
