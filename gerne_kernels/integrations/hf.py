"""GERNE in HF Trainer's stock loop: ``GERNETrainer``, and the two overrides it is made of.

The stock loop runs one forward and one backward per micro-batch, then clips
(``max_grad_norm``) and steps once every ``gradient_accumulation_steps`` micro-batches. GERNE
fits it in the one-backward mode: each micro-batch is a pair ``B_b || B_lb`` drawn by a
``TwoBatchSampler`` (``two_batch_train_dataloader``), and ``compute_loss`` returns
``opt.extrapolated_loss(loss_b, loss_lb)`` (``extrapolated_compute_loss``), whose one backward
gives g = (1 + beta) g_lb - beta g_b in ``.grad``. The Trainer's own division by the
accumulation steps, clipping and GradScaler then act on g itself.

A Trainer of your own takes the same two overrides (docs/integrations.md). The optimizer comes
in through ``Trainer(optimizers=(opt, scheduler))``; once training starts ``trainer.optimizer``
is accelerate's AcceleratedOptimizer around it (``trainer.optimizer.optimizer`` is the GERNE
optimizer, which ``two_batch_optimizer`` finds).
"""

import inspect

from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.utils import is_datasets_available

from .split import BatchPair, split_two_batch
from .unwrap import two_batch_optimizer


def model_loss(outputs):
    """The loss in a model's outputs, read as Trainer reads it: ``outputs["loss"]`` of a dict
    (a ModelOutput is one), else ``outputs[0]``."""
    return outputs["loss"] if isinstance(outputs, dict) else outputs[0]


def extrapolated_compute_loss(trainer, model, inputs, return_outputs=False):
    """L_ext = (1 + beta) L_lb - beta L_b of one ``B_b || B_lb`` micro-batch, for
    ``Trainer.compute_loss`` in training.

    The inputs are split in halves and each half goes through the model once with its labels,
    so L_b and L_lb are the model's own losses (its loss function, its label handling). With
    ``return_outputs`` the outputs come back as a ``BatchPair``.
    """
    inputs_b, inputs_lb = split_two_batch(inputs)
    outputs = BatchPair(model(**inputs_b), model(**inputs_lb))
    optimizer = two_batch_optimizer(trainer.optimizer)
    loss = optimizer.extrapolated_loss(model_loss(outputs.biased), model_loss(outputs.less_biased))
    return (loss, outputs) if return_outputs else loss


def two_batch_train_dataloader(trainer, sampler):
    """The training DataLoader of ``trainer`` with ``sampler.batch_sampler()`` (each batch is
    ``B_b || B_lb``), the Trainer's collator and unused-column removal, prepared by its
    accelerator.

    accelerate's ``split_batches=True`` would cut each batch across processes (one rank would
    get B_b, the next B_lb), so it is refused; by default each process draws whole pairs.
    """
    if trainer.train_dataset is None:
        raise ValueError("GERNETrainer: training requires a train_dataset")
    if trainer.accelerator.split_batches:
        raise ValueError("accelerate's split_batches=True splits every B_b || B_lb batch across "
                         "processes (B_b to one rank, B_lb to another); leave it False so that "
                         "each process draws whole pairs")
    dataset, collator = trainer.train_dataset, trainer.data_collator
    if is_datasets_available() and _is_hf_dataset(dataset):
        dataset = trainer._remove_unused_columns(dataset, description="training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    args = trainer.args
    workers = args.dataloader_num_workers
    loader = DataLoader(dataset, batch_sampler=sampler.batch_sampler(), collate_fn=collator,
                        num_workers=workers, pin_memory=args.dataloader_pin_memory,
                        persistent_workers=workers > 0 and args.dataloader_persistent_workers)
    return trainer.accelerator.prepare(loader)


def _is_hf_dataset(dataset):
    import datasets

    return isinstance(dataset, datasets.Dataset)


class GERNETrainer(Trainer):
    """``transformers.Trainer`` training with GERNE in the one-backward mode.

    Args:
        two_batch_sampler: the ``gk.TwoBatchSampler`` over ``train_dataset`` that draws each
            micro-batch's pair B_b, B_lb (``per_device_train_batch_size`` is not used in
            training: the sampler's ``batch_size`` per class is).
        everything else: as for Trainer; ``optimizers=(opt, scheduler)`` with ``opt`` a
            ``gk.GERNE`` or ``gk.GERNEWrapper`` (one beta for all param groups).

    Evaluation is the stock one. Each training micro-batch's loss is L_ext of its pair, a mean
    over the pair, which the Trainer divides by the accumulation steps (so the model's
    ``num_items_in_batch`` normalisation is not used); ``label_smoothing_factor`` is refused
    (put it in the model's loss).
    """

    # transformers >= 5: the loss compute_loss returns is a per-micro-batch mean.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, two_batch_sampler, **kwargs):
        # Checked before Trainer's own setup, which reads model.config for label smoothing.
        training_args = inspect.signature(Trainer.__init__).bind(
            self, *args, **kwargs).arguments.get("args")
        if getattr(training_args, "label_smoothing_factor", 0) != 0:
            raise ValueError("GERNETrainer takes L_b and L_lb from the model's outputs, so "
                             "label_smoothing_factor is not applied: put the smoothing in the "
                             "model's loss and set label_smoothing_factor=0")
        super().__init__(*args, **kwargs)
        self.two_batch_sampler = two_batch_sampler
        # Read by every transformers version: the Trainer divides the loss by the
        # accumulation steps and passes no num_items_in_batch to the model.
        self.model_accepts_loss_kwargs = False

    def get_train_dataloader(self):
        return two_batch_train_dataloader(self, self.two_batch_sampler)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation batches are plain batches
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return extrapolated_compute_loss(self, model, inputs, return_outputs)
