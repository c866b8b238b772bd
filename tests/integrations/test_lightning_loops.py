"""GERNE in Lightning's stock loops, against the hand-written loop (integration_task.hand_loop).

Automatic optimization: training_step returns ``self.optimizers().extrapolated_loss(loss_b,
loss_lb)`` (the one-backward mode) and Lightning does the rest: its gradient_clip_val clips g,
accumulate_grad_batches divides and accumulates, bf16-mixed autocasts. Manual optimization:
the stash mode through the LightningOptimizer (stash_biased(), and accumulate_biased() for
accumulation), which proves that the per-step records reach the wrapped optimizer.
"""

import pytest
import torch

pytest.importorskip("lightning")
import lightning as L  # noqa: E402
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402

import integration_task as task_  # noqa: E402
from integration_task import OPTIMIZERS, assert_trained_like, hand_loop  # noqa: E402

STEPS = 4
MAX_NORM = 1.4


class TwoBatchModule(L.LightningModule):
    """The tiny MLP trained on B_b || B_lb batches with ``case``'s GERNE optimizer."""

    def __init__(self, case, mode, accumulation=1, **two_batch_kwargs):
        super().__init__()
        self.net = task_.tiny_net()
        self.case, self.mode, self.accumulation = case, mode, accumulation
        self.two_batch_kwargs = two_batch_kwargs
        self.automatic_optimization = mode == "one-backward"
        self.task = task_.tiny_task()

    def train_dataloader(self):
        return self.task.loader()

    def configure_optimizers(self):
        # Under 16-mixed the stash mode needs the plugin's GradScaler (None otherwise).
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return self.case.gerne(self.net.parameters(), grad_scaler=scaler,
                               **self.two_batch_kwargs)

    def training_step(self, batch, batch_idx):
        loss_b, loss_lb = task_.two_batch_losses(self.net, batch)
        opt = self.optimizers()
        assert isinstance(opt, LightningOptimizer) and opt is not opt.optimizer  # the wrapper
        if self.mode == "one-backward":
            return opt.extrapolated_loss(loss_b, loss_lb)
        if self.mode == "stash":
            self.manual_backward(loss_b)
            opt.stash_biased()
            self.manual_backward(loss_lb)
            opt.step()
            opt.zero_grad()
            return None
        # "accumulate": interleaved micro-batch pairs, one step per `accumulation` of them
        n = self.accumulation
        with opt.accumulate_biased():
            self.manual_backward(loss_b / n)
        self.manual_backward(loss_lb / n)
        if (batch_idx + 1) % n == 0:
            opt.step()
            opt.zero_grad()
        return None


def fit(module, **trainer_kwargs):
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_automatic_optimization_clips_and_accumulates_g(case, tmp_path):
    """Lightning's gradient_clip_val and accumulate_grad_batches act on g itself."""
    module = TwoBatchModule(case, "one-backward")
    trainer = fit(module, default_root_dir=tmp_path, gradient_clip_val=MAX_NORM,
                  accumulate_grad_batches=2)
    assert trainer.global_step == STEPS
    oracle = hand_loop(module.task, case, STEPS, accumulation=2, max_norm=MAX_NORM)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(module.net.parameters(), oracle)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_automatic_optimization_bf16_mixed(case, tmp_path):
    """bf16-mixed: Lightning's mixed-precision plugin refuses gradient_clip_val for every
    optimizer that unscales in its step (GERNE does, for GradScaler), so g is clipped by the
    optimizer's max_grad_norm."""
    module = TwoBatchModule(case, "one-backward", max_grad_norm=MAX_NORM)
    fit(module, default_root_dir=tmp_path, precision="bf16-mixed", accumulate_grad_batches=2)
    oracle = hand_loop(module.task, case, STEPS, accumulation=2, max_norm=MAX_NORM,
                       autocast_dtype=torch.bfloat16, scaled_losses=True)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(module.net.parameters(), oracle)


def test_automatic_optimization_without_accumulation(tmp_path):
    """accumulate_grad_batches=1: Lightning calls zero_grad() between training_step (which
    builds L_ext) and its backward; the step must still know it is fed g."""
    case = OPTIMIZERS[0]
    module = TwoBatchModule(case, "one-backward")
    fit(module, default_root_dir=tmp_path)
    assert_trained_like(module.net.parameters(), hand_loop(module.task, case, STEPS))


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_manual_optimization_stash_mode(case, tmp_path):
    module = TwoBatchModule(case, "stash")
    fit(module, default_root_dir=tmp_path)
    assert_trained_like(module.net.parameters(), hand_loop(module.task, case, STEPS))


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_manual_optimization_accumulate_biased_and_clip_in_the_step(case, tmp_path):
    """Interleaved pairs accumulated with accumulate_biased(); g clipped by the optimizer's
    max_grad_norm (Lightning's clipping would see g_lb only, and refuses manual optimization)."""
    module = TwoBatchModule(case, "accumulate", accumulation=2, max_grad_norm=MAX_NORM)
    fit(module, default_root_dir=tmp_path)
    oracle = hand_loop(module.task, case, STEPS, accumulation=2, max_norm=MAX_NORM)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(module.net.parameters(), oracle)


def test_manual_stash_mode_16_mixed_with_the_plugins_grad_scaler(tmp_path):
    """16-mixed (on the CPU through an explicit plugin: Lightning maps the flag to bf16 there):
    manual_backward scales both losses, the stash is unscaled by the optimizer, which knows
    the plugin's scaler (grad_scaler=trainer.precision_plugin.scaler)."""
    from lightning.pytorch.plugins import MixedPrecision

    case = OPTIMIZERS[0]
    module = TwoBatchModule(case, "stash")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    fit(module, default_root_dir=tmp_path, plugins=[plugin])
    assert module.optimizers().optimizer.grad_scaler is plugin.scaler
    assert plugin.scaler.get_scale() == 256.0  # no overflow: no step was skipped
    oracle = hand_loop(module.task, case, STEPS, autocast_dtype=torch.float16)
    assert_trained_like(module.net.parameters(), oracle)
