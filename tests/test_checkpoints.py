"""Save mid-run (through torch.save/torch.load), load into a freshly built model and optimizer,
continue: the trajectory must be bit-identical to an uninterrupted run, for GERNE and for the
wrapper, between steps and with a biased gradient stashed, with and without a GradScaler."""

import io

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import loss_of, make_batches, make_model

KINDS = {
    "gerne-sgd": lambda ps: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9, beta=1.5),
    "gerne-adamw": lambda ps: gk.GERNE(ps, optimizer="adamw", lr=1e-2, amsgrad=True, beta=1.5),
    "wrapper-sgd": lambda ps: gk.GERNEWrapper(
        torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), beta=1.5),
    "wrapper-adamw": lambda ps: gk.GERNEWrapper(torch.optim.AdamW(ps, lr=1e-2), beta=1.5),
}
STEPS, AT = 6, 3


def build(kind, amp, seed):
    model = make_model(seed=seed)
    opt = KINDS[kind](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2, enabled=amp)
    opt.grad_scaler = scaler
    return model, opt, scaler


def first_half(model, opt, scaler, x_b, amp):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = loss_of(model, x_b)
    scaler.scale(loss).backward()
    opt.stash_biased()


def second_half(model, opt, scaler, x_lb, amp):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = loss_of(model, x_lb)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def run(kind, amp, checkpoint_at=None, stashed=False):
    model, opt, scaler = build(kind, amp, seed=1)
    for i, (x_b, x_lb) in enumerate(make_batches(STEPS)):
        if i == checkpoint_at:
            if stashed:
                first_half(model, opt, scaler, x_b, amp)
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "scaler": scaler.state_dict()}, buffer)
            model, opt, scaler = build(kind, amp, seed=2)  # a different init, to overwrite
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            scaler.load_state_dict(saved["scaler"])
            if stashed:
                second_half(model, opt, scaler, x_lb, amp)
                continue
        first_half(model, opt, scaler, x_b, amp)
        second_half(model, opt, scaler, x_lb, amp)
    state = opt.state_dict()
    return model, state.get("base", state)["state"], scaler.get_scale() if amp else None


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("stashed", [False, True], ids=["between-steps", "stash-pending"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_resumed_run_is_bit_identical(kind, stashed, amp):
    model, state, scale = run(kind, amp)
    resumed_model, resumed_state, resumed_scale = run(kind, amp, checkpoint_at=AT,
                                                      stashed=stashed)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert state.keys() == resumed_state.keys()
    for index in state:
        for key in state[index]:
            assert torch.equal(torch.as_tensor(state[index][key]),
                               torch.as_tensor(resumed_state[index][key])), key
    assert scale == resumed_scale
