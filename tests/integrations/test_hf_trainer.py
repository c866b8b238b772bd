"""GERNETrainer (HF Trainer's stock loop, one-backward mode) against the hand-written loop.

A plain nn.Module returning {"loss", "logits"} as HF models do, a dataset of dicts (with an
extra "attribute" column that the Trainer's unused-column removal must drop), the optimizer
through ``optimizers=(opt, None)``, gradient_accumulation_steps=2 and max_grad_norm; offline
(conftest.py sets HF_HUB_OFFLINE), report_to="none", nothing saved.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments  # noqa: E402

import integration_task as task_  # noqa: E402
from gerne_kernels.integrations import split_two_batch, two_batch_optimizer  # noqa: E402
from gerne_kernels.integrations.hf import GERNETrainer  # noqa: E402
from integration_task import OPTIMIZERS, assert_trained_like, hand_loop  # noqa: E402

STEPS = 4
MAX_NORM = 1.4


class TinyClassifier(torch.nn.Module):
    """The tiny MLP with HF's calling convention: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.net = task_.tiny_net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return outputs


class DictDataset(torch.utils.data.Dataset):
    """The tiny task's samples as HF-style dicts."""

    def __init__(self, task):
        self.task = task

    def __len__(self):
        return len(self.task.y)

    def __getitem__(self, i):
        return {"x": self.task.x[i], "labels": self.task.y[i], "attribute": self.task.a[i]}


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=STEPS, gradient_accumulation_steps=2,
                    max_grad_norm=MAX_NORM, lr_scheduler_type="constant", report_to="none",
                    use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def gerne_trainer(tmp_path, task, model, opt, **argument_overrides):
    """A GERNETrainer of ``model`` on ``task`` (train and eval data), ``opt`` its optimizer
    (None: the Trainer builds its own)."""
    return GERNETrainer(model=model, args=arguments(tmp_path, **argument_overrides),
                        train_dataset=DictDataset(task), eval_dataset=DictDataset(task),
                        optimizers=(opt, None), two_batch_sampler=task.sampler())


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_gerne_trainer_accumulates_and_clips_g(case, tmp_path):
    task, model = task_.tiny_task(), TinyClassifier()
    opt = case.gerne(model.parameters())
    trainer = gerne_trainer(tmp_path, task, model, opt)
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert trainer.optimizer.optimizer is opt and two_batch_optimizer(trainer.optimizer) is opt
    oracle = hand_loop(task, case, STEPS, accumulation=2, max_norm=MAX_NORM)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(model.parameters(), oracle)


def test_gerne_trainer_evaluates_plain_batches(tmp_path):
    """Evaluation batches are no pairs: the stock compute_loss handles them."""
    task, model = task_.tiny_task(), TinyClassifier()
    trainer = gerne_trainer(tmp_path, task, model, OPTIMIZERS[0].gerne(model.parameters()),
                            per_device_eval_batch_size=7)
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model.net(task.x), task.y)
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)


def test_gerne_trainer_refuses_label_smoothing(tmp_path):
    task, model = task_.tiny_task(), TinyClassifier()
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        gerne_trainer(tmp_path, task, model, OPTIMIZERS[0].gerne(model.parameters()),
                      label_smoothing_factor=0.1)


def test_trainer_without_a_gerne_optimizer_says_so(tmp_path):
    task, model = task_.tiny_task(), TinyClassifier()
    trainer = gerne_trainer(tmp_path, task, model, None)  # the Trainer builds its own AdamW
    with pytest.raises(TypeError, match="optimizers=\\(opt, scheduler\\)"):
        trainer.train()


class ConcatForwardTrainer(GERNETrainer):
    """docs/integrations.md's one-forward compute_loss, verbatim."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels_b, labels_lb = split_two_batch(inputs.pop("labels"))
        logits_b, logits_lb = split_two_batch(model(**inputs)["logits"])
        opt = two_batch_optimizer(self.optimizer)
        loss = opt.extrapolated_loss(F.cross_entropy(logits_b, labels_b),
                                     F.cross_entropy(logits_lb, labels_lb))
        return (loss, None) if return_outputs else loss


def test_one_forward_over_the_pair(tmp_path):
    task, model, case = task_.tiny_task(), TinyClassifier(), OPTIMIZERS[0]
    trainer = ConcatForwardTrainer(model=model, args=arguments(tmp_path),
                                   train_dataset=DictDataset(task),
                                   optimizers=(case.gerne(model.parameters()), None),
                                   two_batch_sampler=task.sampler())
    trainer.train()
    oracle = hand_loop(task, case, STEPS, accumulation=2, max_norm=MAX_NORM)
    assert_trained_like(model.parameters(), oracle)


def test_bf16_on_the_cpu(tmp_path):
    """TrainingArguments(bf16=True): accelerate autocasts the forwards, g is clipped as is."""
    task, model, case = task_.tiny_task(), TinyClassifier(), OPTIMIZERS[0]
    gerne_trainer(tmp_path, task, model, case.gerne(model.parameters()), bf16=True).train()
    oracle = hand_loop(task, case, STEPS, accumulation=2, max_norm=MAX_NORM,
                       autocast_dtype=torch.bfloat16, scaled_losses=True)
    assert_trained_like(model.parameters(), oracle)
