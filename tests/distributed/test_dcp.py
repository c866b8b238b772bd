"""torch.distributed.checkpoint in one process: get_state_dict / set_state_dict (the "DSD" API)
and dcp.save / dcp.load round-trip GERNE and GERNEWrapper, and the resumed run is bit-identical
to the run without a checkpoint (parameters and optimizer state), between steps and with a
biased gradient stashed, with the skip count kept. DCP's priming step on a fresh optimizer
(lr = 0 on zero gradients, run by get_optimizer_state_dict when the state is empty) moves no
parameter and leaves the state torch.optim's priming leaves; on a trained optimizer it changes
nothing. Under FSDP2: tests/distributed/test_fsdp2.py.
"""

import io
import warnings

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import (assert_same, loss_of, make_batches, make_model, oracle_step,
                           snapshot)
from dist_launch import BACKEND

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,  # noqa: E402
                                                     get_state_dict, set_state_dict)

BETA = 1.5
STEPS, AT, SKIP_AT = 5, 3, 1  # checkpoint in step AT; an inf skips step SKIP_AT

# kind: (GERNE optimizer, the torch.optim optimizer it must match)
KINDS = {
    "gerne-sgd": (lambda ps: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9, beta=BETA,
                                      backend=BACKEND, skip_nonfinite=True),
                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "gerne-adamw": (lambda ps: gk.GERNE(ps, optimizer="adamw", lr=1e-2, beta=BETA,
                                        backend=BACKEND, skip_nonfinite=True),
                    lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "wrapper-adamw": (lambda ps: gk.GERNEWrapper(torch.optim.AdamW(ps, lr=1e-2), beta=BETA,
                                                 backend=BACKEND, skip_nonfinite=True),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
}
EXTRA_GROUP_KEYS = {"beta", "beta_bounds", gk.GERNE.SKIPPED_KEY}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore")
        yield


def build(kind, seed):
    model = make_model(seed=seed)
    return model, KINDS[kind][0](model.parameters())


def first_half(model, opt, x_b, inject=False):
    opt.zero_grad()
    loss_of(model, x_b).backward()
    if inject:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    opt.stash_biased()


def second_half(model, opt, x_lb):
    loss_of(model, x_lb).backward()
    opt.step()


def resume(model, opt, kind, via, path, stash_slots):
    """Checkpoints model and opt, and loads the checkpoint into a freshly built pair."""
    model_sd, optim_sd = get_state_dict(model, opt)
    if via == "dcp":
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    else:  # the full state dicts through torch.save
        buffer = io.BytesIO()
        torch.save({"model": model_sd, "optim": optim_sd}, buffer)
    model, opt = build(kind, seed=2)
    if via == "dcp":
        model_sd, optim_sd = get_state_dict(model, opt)  # the template (DCP primes opt)
        if stash_slots:  # dcp.load fills only the template's keys
            for name, p in model.named_parameters():
                optim_sd["state"][name]["grad_b"] = torch.empty_like(p)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
    else:
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


def run(kind, when=None, via=None, path=None):
    model, opt = build(kind, seed=1)
    for i, (x_b, x_lb) in enumerate(make_batches(STEPS)):
        if i == AT and when is not None:
            if when == "stash-pending":
                first_half(model, opt, x_b)
            else:
                opt.zero_grad()  # no .grad left: DCP runs its priming check on a trained opt
            model, opt = resume(model, opt, kind, via, path, when == "stash-pending")
            assert opt.has_stash() == (when == "stash-pending")
            assert opt.skipped_steps == 1
            if when == "stash-pending":
                second_half(model, opt, x_lb)
                continue
        first_half(model, opt, x_b, inject=i == SKIP_AT)
        second_half(model, opt, x_lb)
    assert opt.skipped_steps == 1
    return snapshot(model, opt.state_dict()["state"])


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("when", ["between-steps", "stash-pending"])
@pytest.mark.parametrize("via", ["dcp", "state-dict"])
def test_resumed_run_is_bit_identical(tmp_path, kind, when, via):
    assert_same(run(kind, when, via, str(tmp_path / "checkpoint")), run(kind))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_priming_a_fresh_optimizer_moves_nothing_and_matches_torch(kind):
    """get_optimizer_state_dict before any step: no parameter moves, the state is the one
    DCP's priming gives torch.optim, and training on follows torch.optim primed the same way."""
    model, opt = build(kind, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    primed = get_optimizer_state_dict(model, opt)
    torch_model = make_model(seed=1)
    torch_opt = KINDS[kind][1](torch_model.parameters())
    torch_primed = get_optimizer_state_dict(torch_model, torch_opt)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())
    assert primed["state"].keys() == torch_primed["state"].keys()
    for name, entry in torch_primed["state"].items():
        assert primed["state"][name].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(primed["state"][name][key]).float(),
                               torch.as_tensor(value).float()), (name, key)
    for group, torch_group in zip(primed["param_groups"], torch_primed["param_groups"]):
        # GERNE's "adamw" is decoupled by name: torch's AdamW also keeps the flag in its groups
        assert set(torch_group) - {"decoupled_weight_decay"} <= set(group)
        assert group["lr"] == torch_group["lr"] != 0  # restored after the priming step
    for x_b, x_lb in make_batches(3):
        first_half(model, opt, x_b)
        second_half(model, opt, x_lb)
        oracle_step(torch_model, torch_opt, x_b, x_lb, BETA)
    for p, q in zip(model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_calls_on_a_trained_optimizer_change_nothing(kind):
    model, opt = build(kind, seed=1)
    for x_b, x_lb in make_batches(2):
        first_half(model, opt, x_b)
        second_half(model, opt, x_lb)
    opt.zero_grad()
    before = snapshot(model, opt.state_dict()["state"])
    for _ in range(2):
        get_optimizer_state_dict(model, opt)
    assert_same(snapshot(model, opt.state_dict()["state"]), before)


def test_wrapper_state_dict_has_torch_optims_layout():
    model, opt = build("wrapper-adamw", seed=1)
    torch_model = make_model(seed=1)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-2)
    for x_b, x_lb in make_batches(2):
        first_half(model, opt, x_b)
        second_half(model, opt, x_lb)
        oracle_step(torch_model, torch_opt, x_b, x_lb, BETA)
    first_half(model, opt, make_batches(1)[0][0])  # a stash pending
    ours, theirs = opt.state_dict(), torch_opt.state_dict()
    assert ours.keys() == theirs.keys() == {"state", "param_groups"}
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys() | {"grad_b"}
        for key, value in entry.items():
            torch.testing.assert_close(ours["state"][index][key], value, rtol=1e-5, atol=1e-6)
    for group, torch_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert set(group) == set(torch_group) | EXTRA_GROUP_KEYS


def test_stash_that_dcp_load_did_not_fill_is_an_error(tmp_path):
    """A checkpoint saved with a stash pending, loaded through a template without the stash's
    slots: the stash is not restored, and the step that would need it raises."""
    model, opt = build("gerne-adamw", seed=1)
    (x_b, x_lb), = make_batches(1)
    first_half(model, opt, x_b)
    second_half(model, opt, x_lb)
    first_half(model, opt, x_b)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    model, opt = build("gerne-adamw", seed=2)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert not opt.has_stash()
    loss_of(model, x_lb).backward()
    with pytest.raises(RuntimeError, match="needs the biased batch's gradient"):
        opt.step()
