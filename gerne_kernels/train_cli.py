"""``python -m gerne_kernels train``: GERNE on a local copy of a benchmark, with the paper's
settings.

    python -m gerne_kernels train --dataset waterbirds --root data/waterbird_complete95_forest2water2
    python -m gerne_kernels train --dataset civilcomments --root data/civilcomments --bert models/bert-base-uncased
    python -m gerne_kernels train --dataset cmnist --root data/cmnist/1pct --attributes unknown --t 0.01

The folders are read by :mod:`gerne_kernels.datasets` in their release layouts (a missing
folder or split file is an error naming the path and the layout expected). Defaults per
dataset (App. F of the paper; epochs are ours, the paper does not give them):

| dataset | model | optimizer | lr | batch per class | c | select | epochs |
| --- | --- | --- | --- | --- | --- | --- | --- |
| cmnist | 3-layer MLP | SGD m=0.9 wd=0.01 | 0.1 (unknown attr.: 0.01) | 100 | 0.5 | GBA | 100 |
| ccifar10 | ResNet-18, pretrained | SGD m=0.9 wd=0.01 | 1e-4 | 100 | 0.5 | GBA | 100 |
| waterbirds | ResNet-50 + MLP head, pretrained | SGD m=0.9 wd=0.01 | 1e-4 | 16 (32 per batch) | 0.5 | WGA | 100 |
| celeba | ResNet-50 + MLP head, pretrained | SGD m=0.9 wd=0.01 | 1e-4 | 16 (32 per batch) | 0.5 | WGA | 20 |
| civilcomments | BERT + MLP head | AdamW wd=1e-4 | 1e-5 | 10 (5 per group) | 1 | WGA | 5 |

"100 per group" for the Colored MNIST / Corrupted CIFAR-10 batches is read as 100 samples
per class in each of the two batches. beta defaults to ``1/c - 1`` (``c * (beta + 1) = 1``,
every group weighted equally in expectation); the paper tunes it inside the Eq. 9 bounds:
pass ``--beta`` or ``--beta-frac`` (a fraction of the range up to beta_max, see
:class:`gerne_kernels.strategies.GERNEStrategy`).

An epoch is ``ceil(N / (K * batch))`` steps (``--steps-per-epoch`` overrides it). After each
epoch the model is evaluated on the validation split (GBA, WGA, every group) and the
checkpoint with the best ``--select`` metric is kept (the paper's protocol); a resumable
checkpoint is written atomically (``--checkpoint``, default ``OUT/checkpoint.pt``; rerun the
same command to resume). At the end the kept model is evaluated on the test split and
``OUT/result.json`` holds test GBA, WGA and every group's accuracy.

``--attributes unknown`` runs Algorithm 2: a biased model (same architecture, a tenth of
the learning rate, twice the weight decay, ``--biased-epochs``, selected by validation CBA),
pseudo-groups by ``--t``, then GERNE on them.

On a GPU: bfloat16 autocast, channels_last for the convnets, GERNE's fused backend.
Pretrained weights come from ``--weights PATH`` or torchvision's cache
(``--from-scratch`` skips them); CivilComments reads a local BERT checkpoint (``--bert``)
through transformers. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from . import datasets, models
from .bounds import beta_bounds
from .sampler import group_counts
from .strategies import (Batch, DatasetSource, GERNEStrategy, GERNEUnknown, LoopSettings,
                         OptimizerSettings, TrainSetup, evaluate, train)

__all__ = ["main", "build_parser", "PAPER_SETTINGS", "PaperSettings"]


@dataclass(frozen=True)
class PaperSettings:
    """A dataset's loader and the paper's training settings for it."""

    loader: str            # a function of gerne_kernels.datasets
    model: str             # mlp, resnet18, resnet50, bert
    head: str              # linear or mlp
    optimizer: str
    lr: float
    lr_unknown: float      # the learning rate with unknown attributes
    weight_decay: float
    batch_size: int        # per class, in each of the two batches
    c: float
    select: str
    epochs: int
    image_size: Optional[int]


PAPER_SETTINGS = {
    "cmnist": PaperSettings("colored_mnist_folder", "mlp", "linear", "sgd", 0.1, 0.01, 0.01,
                            100, 0.5, "gba", 100, 28),
    "ccifar10": PaperSettings("corrupted_cifar10_folder", "resnet18", "linear", "sgd", 1e-4,
                              1e-4, 0.01, 100, 0.5, "gba", 100, 32),
    "waterbirds": PaperSettings("waterbirds", "resnet50", "mlp", "sgd", 1e-4, 1e-4, 0.01, 16,
                                0.5, "wga", 100, 224),
    "celeba": PaperSettings("celeba", "resnet50", "mlp", "sgd", 1e-4, 1e-4, 0.01, 16, 0.5,
                            "wga", 20, 224),
    "civilcomments": PaperSettings("civilcomments", "bert", "mlp", "adamw", 1e-5, 1e-5, 1e-4,
                                   10, 1.0, "wga", 5, None),
}

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gerne_kernels train",
        description="Train GERNE on a local copy of a benchmark with the paper's settings "
                    "(see docs/train.md).")
    p.add_argument("--dataset", required=True, choices=sorted(PAPER_SETTINGS))
    p.add_argument("--root", required=True, help="the dataset's folder (its release layout)")
    p.add_argument("--out", default=None, help="output folder (default train_out/DATASET)")
    p.add_argument("--attributes", choices=["known", "unknown"], default="known")
    p.add_argument("--t", type=float, default=0.05,
                   help="unknown attributes: share of each class made pseudo-group 1")
    p.add_argument("--biased-epochs", type=int, default=None,
                   help="unknown attributes: epochs of the biased model (default epochs / 5)")
    p.add_argument("--c", type=float, default=None, help="B_lb's mixing factor (Eq. 4)")
    beta = p.add_mutually_exclusive_group()
    beta.add_argument("--beta", type=float, default=None, help="default 1/c - 1")
    beta.add_argument("--beta-frac", type=float, default=None,
                      help="beta as a fraction in [0, 1] of the range up to beta_max (Eq. 9)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="samples per class per batch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default ceil(N / (K * batch-size))")
    p.add_argument("--select", choices=["gba", "wga"], default=None,
                   help="validation metric that picks the checkpoint")
    p.add_argument("--model", choices=["mlp", "resnet18", "resnet50", "bert"], default=None,
                   help="override the paper's model (e.g. a small one for a test)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--weights", default=None, help="pretrained ResNet state_dict (.pth)")
    p.add_argument("--from-scratch", action="store_true", help="no pretrained weights")
    p.add_argument("--bert", default=None, help="local BERT checkpoint folder (CivilComments)")
    p.add_argument("--max-length", type=int, default=220, help="tokens per comment")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, none on the CPU)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep convnets in the default memory format on CUDA")
    p.add_argument("--backend", default="auto", help="GERNE's kernel backend")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default 4 on CUDA, 0 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="default OUT/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs of this invocation (resume later)")
    p.add_argument("--no-progress", action="store_true")
    return p


@dataclass
class RunConfig:
    """The resolved settings of one run (recorded in result.json)."""

    dataset: str
    root: str
    attributes: str
    model: str
    head: str
    pretrained: bool
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    c: float
    beta: Optional[float]
    beta_frac: Optional[float]
    t: Optional[float]
    select: str
    epochs: int
    biased_epochs: Optional[int]
    image_size: Optional[int]
    device: str
    amp: Optional[str]
    channels_last: bool
    seed: int


def resolve(args) -> RunConfig:
    """The paper's settings for the dataset, overridden by the arguments given."""
    paper = PAPER_SETTINGS[args.dataset]
    model = args.model or paper.model
    if (model == "bert") != (args.dataset == "civilcomments"):
        raise SystemExit(f"--model {model} does not fit --dataset {args.dataset} (bert is for "
                         "CivilComments' text, the others for images)")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = args.amp if args.amp != "auto" else ("bf16" if device.startswith("cuda") else "none")
    unknown = args.attributes == "unknown"
    epochs = args.epochs or paper.epochs
    for name in ("epochs", "batch_size", "steps_per_epoch", "biased_epochs", "image_size",
                 "stop_after", "workers", "max_length"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return RunConfig(
        dataset=args.dataset, root=args.root, attributes=args.attributes, model=model,
        head=paper.head if model == paper.model else "linear",
        pretrained=model in ("resnet18", "resnet50") and not args.from_scratch,
        optimizer=paper.optimizer,
        lr=args.lr if args.lr is not None else (paper.lr_unknown if unknown else paper.lr),
        weight_decay=args.weight_decay if args.weight_decay is not None else paper.weight_decay,
        batch_size=args.batch_size or paper.batch_size,
        c=args.c if args.c is not None else paper.c, beta=args.beta, beta_frac=args.beta_frac,
        t=args.t if unknown else None, select=args.select or paper.select, epochs=epochs,
        biased_epochs=(args.biased_epochs or max(1, epochs // 5)) if unknown else None,
        image_size=args.image_size or paper.image_size, device=device,
        amp=None if amp == "none" else amp,
        channels_last=device.startswith("cuda") and model.startswith("resnet")
        and not args.no_channels_last,
        seed=args.seed)


def _image_transform(cfg: RunConfig):
    from torchvision import transforms

    size = cfg.image_size
    steps = []
    if size is not None:
        # the usual crop of the group-DRO benchmarks for large images, a plain resize else
        steps += ([transforms.Resize(int(round(size / 0.875))), transforms.CenterCrop(size)]
                  if size >= 64 else [transforms.Resize((size, size))])
    steps.append(transforms.ToTensor())
    if cfg.model != "mlp":
        steps.append(transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD))
    return transforms.Compose(steps)


def load_splits(cfg: RunConfig):
    """The train, val and test datasets; errors name the path and the layout expected."""
    loader = getattr(datasets, PAPER_SETTINGS[cfg.dataset].loader)
    transform = None if cfg.model == "bert" else _image_transform(cfg)
    try:
        return [loader(cfg.root, split, transform) for split in ("train", "val", "test")]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"train --dataset {cfg.dataset} --root {cfg.root}: {exc}") from None


class TextCollate:
    """Tokenizes a list of ``(text, y, a)`` items into one :class:`Batch`."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items):
        texts, ys, as_ = zip(*items)
        x = dict(self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt"))
        return Batch(x, torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(as_, dtype=torch.long))


def model_factory(cfg: RunConfig, num_classes: int, args):
    """A zero-argument factory of the run's model (seeded: the same initial model each call);
    missing weights fail here, before any training."""
    if cfg.pretrained:
        try:
            models.pretrained_resnet_path(cfg.model, args.weights)
        except FileNotFoundError as exc:
            raise SystemExit(f"train: {exc}") from None

    def make():
        torch.manual_seed(cfg.seed)
        if cfg.model == "mlp":
            return models.mlp(3 * cfg.image_size * cfg.image_size, num_classes)
        if cfg.model == "bert":
            return models.bert_classifier(args.bert, num_classes)
        net = models.resnet(cfg.model, num_classes, head=cfg.head, pretrained=cfg.pretrained,
                            weights=args.weights)
        return models.ChannelsLast(net) if cfg.channels_last else net

    return make


def _checked_strategy(cfg: RunConfig, steps_per_epoch: int, train_set):
    """GERNE for the run, its beta checked against Eq. 9 before anything is trained or
    written (the pseudo-groups' sizes are known before the biased model is)."""
    beta = dict(beta=cfg.beta, beta_frac=cfg.beta_frac)
    try:
        if cfg.attributes == "unknown":
            strategy = GERNEUnknown(cfg.t, c=cfg.c,
                                    biased_steps=cfg.biased_epochs * steps_per_epoch, **beta)
            counts = strategy.pseudo_group_counts(train_set.labels)
        else:
            strategy = GERNEStrategy(cfg.c, **beta)
            counts = group_counts(train_set.labels, train_set.attributes)
        strategy.resolve_beta(beta_bounds(counts=counts, c=cfg.c))
    except ValueError as exc:
        raise SystemExit(f"train: --beta/--beta-frac/--c/--t: {exc}") from None
    return strategy


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    if cfg.t is not None and not 0 < cfg.t <= 0.5:
        raise SystemExit(f"--t must be in (0, 1/2], got {cfg.t}")
    if not 0 < cfg.c <= 1:
        raise SystemExit(f"--c must be in (0, 1], got {cfg.c}")
    train_set, val_set, test_set = load_splits(cfg)
    num_classes = int(max(int(train_set.labels.max()), int(val_set.labels.max()),
                          int(test_set.labels.max()))) + 1
    collate = None
    if cfg.model == "bert":
        try:
            collate = TextCollate(models.load_tokenizer(args.bert), args.max_length)
        except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
            raise SystemExit(f"train --dataset civilcomments: {exc}") from None
    make_model = model_factory(cfg, num_classes, args)
    cuda = cfg.device.startswith("cuda")
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    sources = [DatasetSource(d, collate, workers, pin_memory=cuda)
               for d in (train_set, val_set, test_set)]
    steps_per_epoch = args.steps_per_epoch or math.ceil(len(train_set) / (num_classes *
                                                                          cfg.batch_size))
    strategy = _checked_strategy(cfg, steps_per_epoch, train_set)
    out = args.out or os.path.join("train_out", cfg.dataset)
    os.makedirs(out, exist_ok=True)
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        total = cfg.epochs * steps_per_epoch + (cfg.biased_epochs or 0) * steps_per_epoch
        bar = tqdm(total=total, unit="step", dynamic_ncols=True, desc=cfg.dataset)
    setup = TrainSetup(make_model, sources[0], sources[1],
                       OptimizerSettings(cfg.optimizer, cfg.lr, 0.9, cfg.weight_decay,
                                         args.backend),
                       cfg.batch_size, torch.device(cfg.device), seed=cfg.seed,
                       amp_dtype=amp_dtype, progress=bar.update if bar else (lambda n: None))

    def report(metrics):
        epoch = metrics["step"] // steps_per_epoch
        line = (f"epoch {epoch}/{cfg.epochs}: val GBA {100 * metrics['gba']:.2f} "
                f"WGA {100 * metrics['wga']:.2f}")
        if bar is not None:
            bar.set_postfix_str(line)
        else:
            print(line, flush=True)

    start = time.perf_counter()
    try:
        result = train(make_model(), strategy, setup,
                       LoopSettings(steps=cfg.epochs * steps_per_epoch, eval_every=steps_per_epoch,
                                    select=cfg.select, schedule="constant", seed=cfg.seed,
                                    checkpoint=args.checkpoint or os.path.join(out, "checkpoint.pt"),
                                    stop_after=args.stop_after),
                       on_eval=report)
    except ValueError as exc:  # a checkpoint of another run
        raise SystemExit(f"train: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    if not result.finished:
        print(f"stopped after epoch {result.steps_done // steps_per_epoch} of {cfg.epochs}; "
              "run the same command again to resume")
        return 0
    test = evaluate(result.model, sources[2], setup.device, amp_dtype)
    payload = {"config": asdict(cfg), "beta": strategy.beta, "c": strategy.c,
               "beta_bounds": [strategy.bounds.low, strategy.bounds.high],
               "beta_bounds_source": strategy.bounds.source,
               "steps_per_epoch": steps_per_epoch, "selected_by": f"val {cfg.select}",
               "best_epoch": result.best_step // steps_per_epoch, "best_step": result.best_step,
               "val_history": result.history, "test": test,
               "biased_model": getattr(strategy, "biased_info", None),
               "seconds_this_invocation": time.perf_counter() - start}
    path = os.path.join(out, "result.json")
    _write_json(path, payload)
    print(f"{cfg.dataset}: checkpoint of epoch {payload['best_epoch']} (best val "
          f"{cfg.select.upper()}); test GBA {100 * test['gba']:.2f} WGA {100 * test['wga']:.2f}")
    print(f"json: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
